"""`make-tiny-model`: a small random Mixtral and a tokenizer, made here with no downloads.

The model comes from transformers' own `MixtralConfig` and `MixtralForCausalLM` (random weights,
fixed seed) saved with `save_pretrained`, so `pack` reads it exactly as it reads a real
checkpoint. The tokenizer is a byte-level BPE trained by the `tokenizers` library on a few
paragraphs written below."""

from __future__ import annotations

from pathlib import Path

import torch

from common.errors import ConfigError
from common.model_config import FAMILY_NAMES

CORPUS = """\
Mixture-of-experts models route every token through a few of many expert networks. Only two of
eight experts run for a token, so most of the weights sit idle at any moment. That is why the
experts can live in host memory, on a solid state disk, or in the memory of another computer on
the same network, and come to the graphics card just in time.
A small cache on the graphics card keeps the experts that were used most recently. When the
router of the next layer is applied to the hidden state of the current layer, it guesses which
experts will be needed soon, and the copies start before the layer asks for them.
The quick brown fox jumps over the lazy dog. A home lab has several computers: one with a good
graphics card and others with plenty of memory. Each one can hold a share of the experts and send
them over the network when the coordinator asks. If one computer stops answering, another copy of
the same expert is fetched from a replica, and the generated text does not change at all.
Numbers and words: one two three four five six seven eight nine ten, 0 1 2 3 4 5 6 7 8 9.
Hello world! How are you today? The weather is fine, the tea is warm and the code is tested.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Mixtral's unk, bos and eos ids


def build_tokenizer(vocab_size: int = 512, texts: list[str] | None = None):
    """A byte-level BPE tokenizer wrapped for transformers (adds <s> in front, as Mixtral's does),
    trained on `texts` (default: the few paragraphs above)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4 if texts is None else texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _family_config(family: str, *, vocab_size: int, num_layers: int, hidden_size: int, intermediate_size: int,
                   num_experts: int, top_k: int, num_heads: int, num_kv_heads: int):
    """transformers' own config class of the family, small, with each family's special parts on:
    a dense first layer where the family has dense layers, a shared expert, grouped routing."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=intermediate_size, num_local_experts=num_experts,
                                          num_experts_per_tok=top_k, **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=intermediate_size, intermediate_size=2 * intermediate_size,
                                           num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                                           mlp_only_layers=[0], head_dim=hidden_size // num_heads, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(moe_intermediate_size=intermediate_size, intermediate_size=2 * intermediate_size,
                                           shared_expert_intermediate_size=2 * intermediate_size, num_experts=num_experts,
                                           num_experts_per_tok=top_k, mlp_only_layers=[1], **common)
    if family == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=intermediate_size, num_experts=num_experts,
                                        num_experts_per_tok=top_k, **common)
    if family == "glm4_moe":
        return transformers.Glm4MoeConfig(moe_intermediate_size=intermediate_size, intermediate_size=2 * intermediate_size,
                                          n_routed_experts=num_experts, num_experts_per_tok=top_k, n_shared_experts=1,
                                          first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                                          routed_scaling_factor=1.5, num_nextn_predict_layers=0, **common)
    if family == "deepseek_v3":
        # small latent attention (transformers' MLA needs as many KV heads as heads); half the groups
        # chosen, as DeepSeek-V3's 4 of 8 (1 of 2 groups left a 4-bit store's logits off by a group flip)
        return transformers.DeepseekV3Config(
            moe_intermediate_size=intermediate_size, intermediate_size=2 * intermediate_size, n_routed_experts=num_experts,
            num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, rope_interleave=True, num_nextn_predict_layers=0,
            **{**common, "num_key_value_heads": num_heads})
    if family == "gpt_oss":
        # the real rope settings but a short original context, so YaRN's ramp and scaling matter; a
        # window the test prompt crosses; a SwiGLU limit low enough that the clamps act
        yarn = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=64)  # 2048 / 32
        return transformers.GptOssConfig(intermediate_size=intermediate_size, num_local_experts=num_experts,
                                         num_experts_per_tok=top_k, head_dim=hidden_size // num_heads, sliding_window=8,
                                         rope_parameters=yarn, swiglu_limit=3.0, **common)
    raise ConfigError(f"--family {family}: choose one of {', '.join(FAMILY_NAMES)}")


def _spread_routing(model, seed: int) -> None:
    """Random init gives router logits near zero, so the top-k would hang on ties that a rounding
    error flips, and experts so alike that a wrong one goes unseen. Scale the routers and the
    routed experts up (and give sigmoid routers a correction bias) so that both matter."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight"):
                tensor.mul_(30.0)
            elif ".mlp.experts." in name:
                tensor.mul_(8.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def _spread_gpt_oss(model, seed: int) -> None:
    """GPT-OSS's init leaves the attention and expert biases at zero and the sinks and router
    bias near it, where a reader that dropped them would go unseen: draw them all."""
    generator = torch.Generator().manual_seed(seed + 2)
    scale = {"sinks": 1.0, "router.bias": 1.0, "gate_up_proj_bias": 0.5, "down_proj_bias": 0.1, "proj.bias": 0.1}
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            std = next((value for suffix, value in scale.items() if name.endswith(suffix)), None)
            if std is not None:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def make_tiny_model(
    out: str | Path,
    *,
    family: str = "mixtral",
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_experts: int = 8,
    top_k: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random checkpoint folder of `family` (config.json, model.safetensors, tokenizer)
    to `out`. Mixtral's weights are transformers' random init as they are; the other families'
    routers and experts are spread (_spread_routing) so that routing is no near tie."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new folder")
    tokenizer = build_tokenizer()
    config = _family_config(family, vocab_size=len(tokenizer), num_layers=num_layers, hidden_size=hidden_size,
                            intermediate_size=intermediate_size, num_experts=num_experts, top_k=top_k,
                            num_heads=num_heads, num_kv_heads=num_kv_heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if family != "mixtral":
        _spread_routing(model, seed)
    if family == "gpt_oss":
        _spread_gpt_oss(model, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
