"""`make-tiny-model`: a small random Mixtral and a tokenizer, made here with no downloads.

The model comes from transformers' own `MixtralConfig` and `MixtralForCausalLM` (random weights,
fixed seed) saved with `save_pretrained`, so `pack` reads it exactly as it reads a real
checkpoint. The tokenizer is a byte-level BPE trained by the `tokenizers` library on a few
paragraphs written below."""

from __future__ import annotations

from pathlib import Path

import torch

from common.errors import ConfigError

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


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer wrapped for transformers (adds <s> in front, as Mixtral's does)."""
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
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_model(
    out: str | Path,
    *,
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
    """Write a random Mixtral checkpoint folder (config.json, model.safetensors, tokenizer) to `out`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new folder")
    tokenizer = build_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
