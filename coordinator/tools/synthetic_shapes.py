"""The model shapes `make-synthetic` knows, by name: plain numbers, no torch.

Knows only each shape's family (a model_type of coordinator/families/) and the hyper-parameters
of its Hugging Face config, under that family config's own field names (MixtralConfig,
Qwen3MoeConfig, Glm4MoeConfig, GptOssConfig, DeepseekV3Config: their published config.json
values, checked against those classes' defaults); turning them into the store's ModelConfig is the family
module's `model_config`, and writing the store is `synthetic.py`'s job. Kept apart so that
`python -m coordinator make-synthetic --help` can list the names without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError


@dataclass(frozen=True)
class Shape:
    family: str  # the config's model_type
    config: dict = field(default_factory=dict)  # the family config's fields that differ from its defaults
    # how the published checkpoint stores its experts, what --expert-bits left out writes: "hqq" at
    # 2 bits, or "mxfp4" (GPT-OSS), kept as stored by pack (common/mxfp4.py)
    expert_format: str = "hqq"

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]


# gpt-oss-20b's published config.json (gpt-oss-120b differs in its layers and experts only).
GPT_OSS_20B = dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
    attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=131072, swiglu_limit=7.0,
    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                         truncate=False, original_max_position_embeddings=4096))

SHAPES = {
    # Mixtral-8x7B: 32 layers x 8 experts, hidden 4096, expert FFN 14336, 32 heads / 8 KV heads.
    "mixtral-8x7b": Shape("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6)),
    # Small enough for CI, big enough that blobs are not trivial.
    "small": Shape("mixtral", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
        rope_theta=1e6)),
    # Qwen3-30B-A3B: 48 layers x 128 experts (top 8, FFN 768), hidden 2048, 32 heads / 4 KV heads of 128,
    # q/k norms per head, no dense layers (intermediate_size is the unused dense width of its config).
    "qwen3-30b-a3b": Shape("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1e6)),
    "small-qwen3": Shape("qwen3_moe", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        max_position_embeddings=4096, rope_theta=1e6)),
    # GLM-4.5-Air: 46 layers, the first dense (FFN 10944), then 128 routed experts (top 8, FFN 1408) and
    # one shared expert; hidden 4096, 96 heads / 8 KV heads of 128 with q/k/v biases, rotary on half of
    # each head, sigmoid routing with a correction bias. Its multi-token-prediction layer is not written
    # (moe-edge leaves it out of real stores too).
    "glm-4.5-air": Shape("glm4_moe", dict(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=128,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5, attention_bias=True,
        use_qk_norm=False, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=1e6)),
    "small-glm4": Shape("glm4_moe", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=True, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False,
        rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=1e6)),
    # gpt-oss-20b: 24 layers x 32 experts (top 4, FFN 2880, MXFP4 as published), hidden 2880, 64 heads /
    # 8 KV heads of 64 with q/k/v/o biases and a sink per head, a 128-token window on every other layer
    # (GptOssConfig's default layer_types: sliding first), YaRN (factor 32 over 4096 positions),
    # router and expert biases, the clamped SwiGLU (limit 7).
    "gpt-oss-20b": Shape("gpt_oss", GPT_OSS_20B, expert_format="mxfp4"),
    # gpt-oss-120b: as gpt-oss-20b with 36 layers x 128 experts (GptOssConfig's defaults are its values).
    "gpt-oss-120b": Shape("gpt_oss", {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128}, expert_format="mxfp4"),
    "small-gpt-oss": Shape("gpt_oss", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
        attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=4096, swiglu_limit=7.0,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=128)), expert_format="mxfp4"),
    # DeepSeek-V3 (and R1): 61 layers, the first 3 dense (FFN 18432), then 256 routed experts (top 8 by
    # grouped sigmoid: 4 of 8 groups, routed scaling 2.5, FFN 2048) and one shared expert; hidden 7168,
    # multi-head latent attention (128 heads, q_lora_rank 1536, kv_lora_rank 512, nope 128 + rope 64,
    # v 128), YaRN (factor 40 over 4096 positions, mscale 1). The multi-token-prediction layer is not
    # written (pack leaves it out too). Its experts are ~204 GB at 2 bits: use --layers.
    "deepseek-v3": Shape("deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, rms_norm_eps=1e-6, max_position_embeddings=163840,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
    "small-deepseek": Shape("deepseek_v3", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_interleave=True, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=32.0, original_max_position_embeddings=128,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
}


def shape_named(name: str) -> Shape:
    """The shape called `name`, or a one-line refusal naming the shapes there are."""
    if name not in SHAPES:
        raise ConfigError(f"--shape {name}: no such shape; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def layers_kept(shape_name: str, layers: int | None) -> int:
    """How many layers a store cut with `--layers` keeps (all when `layers` is None)."""
    total = shape_named(shape_name).num_layers
    if layers is None:
        return total
    if not 1 <= layers <= total:
        raise ConfigError(f"--layers {layers}: {shape_name} has {total} layers; choose 1 to {total}")
    return layers
