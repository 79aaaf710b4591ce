"""The model shapes `make-synthetic` knows, by name: plain numbers, no torch.

Knows only each shape's family (a model_type of coordinator/families/) and the hyper-parameters
of its Hugging Face config, under that family config's own field names (MixtralConfig,
Qwen3MoeConfig, Glm4MoeConfig); turning them into the store's ModelConfig is the family
module's `model_config`, and writing the store is `synthetic.py`'s job. Kept apart so that
`python -m coordinator make-synthetic --help` can list the names without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError


@dataclass(frozen=True)
class Shape:
    family: str  # the config's model_type
    config: dict = field(default_factory=dict)  # the family config's fields that differ from its defaults

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]


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
