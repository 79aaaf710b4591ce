"""The model's shape, read once from a Hugging Face config and stored in the manifest.

Only the fields the engine needs, with the paper's names where it has them. Reading a Hugging
Face config.json into it is a model family's work (coordinator/families/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

QK_NORMS = ("none", "head", "projection")  # none; RMSNorm per head (Qwen3); over the whole projection (OLMoE)
ROUTERS = ("softmax", "sigmoid_grouped", "topk_softmax")  # Mixtral/Qwen/OLMoE; GLM-4.5/DeepSeek-V3; GPT-OSS
ATTENTIONS = ("grouped", "latent")  # grouped-query (Mixtral and the rest); multi-head latent (DeepSeek-V3)
ROPE_TYPES = ("default", "yarn")  # transformers' rope_type names
EXPERT_ACTIVATIONS = ("silu_gated", "clamped_swiglu")  # SiLU(gate) * up; GPT-OSS's (common/expert_activation.py)
# the families moe-edge runs: coordinator/families/ has one module each; a store of another is refused
FAMILY_NAMES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "gpt_oss")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # one routed expert's FFN width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    # What the families differ in. Each default is Mixtral's, and a field at its default is left
    # out of the store's identity (identity_dict), so stores packed before these existed keep it.
    family: str = "mixtral"  # the model_type of the checkpoint: coordinator/families/<family>.py
    attention_bias: bool = False  # q, k and v projections have biases
    qk_norm: str = "none"  # QK_NORMS
    rotary_dim: int | None = None  # rotary embedding on the first rotary_dim of each head; None: all
    router: str = "softmax"  # ROUTERS
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    router_bias: bool = False  # a per-expert bias added to the scores for the choice only (sigmoid_grouped)
    n_group: int = 1  # sigmoid_grouped: experts in n_group groups, the best topk_group groups chosen first
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by it
    dense_layers: tuple[int, ...] = ()  # layers whose FFN is dense (on the device), not experts
    dense_intermediate_size: int | None = None  # those layers' FFN width
    shared_expert_intermediate_size: int = 0  # a shared expert on the device beside the routed ones (0: none)
    shared_expert_gate: bool = False  # its output scaled by sigmoid(x . gate) (Qwen2-MoE)
    # multi-head latent attention (DeepSeek-V3; coordinator/runtime/latent_attention.py): head_dim is
    # then qk_nope_head_dim + qk_rope_head_dim and num_kv_heads num_heads; the sizes are 0 otherwise
    attention: str = "grouped"  # ATTENTIONS
    q_lora_rank: int | None = None  # q through a q_lora_rank bottleneck (q_a, norm, q_b); None: one q_proj
    kv_lora_rank: int = 0  # the compressed latent of k and v, what the KV cache holds per position
    qk_nope_head_dim: int = 0  # the part of each q/k head without rotary
    qk_rope_head_dim: int = 0  # the rotary part; k's is one head shared by all query heads
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary turns the pairs (x0, x1), (x2, x3).. not the two halves
    # GPT-OSS: attention sinks, an o_proj bias, the window on some layers only, YaRN rotary,
    # experts with biases and a clamped SwiGLU
    attention_sinks: bool = False  # a learned logit per query head joins each softmax, then is dropped
    output_bias: bool = False  # o_proj has a bias
    sliding_layers: tuple[int, ...] | None = None  # the layers sliding_window applies to; None: all of them
    rope_type: str = "default"  # ROPE_TYPES
    rope_factor: float = 1.0  # yarn: the context extension factor
    rope_original_max_position_embeddings: int | None = None  # yarn: the context trained before extension
    rope_beta_fast: float = 32.0  # yarn: the ramp's bounds, in rotations
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True  # yarn: round the ramp's bounds to whole dimensions
    rope_attention_factor: float = 1.0  # cos and sin are multiplied by it (yarn's mscale)
    softmax_scale_factor: float = 1.0  # latent attention with yarn (DeepSeek-V3): the softmax scale times mscale^2
    expert_bias: bool = False  # each expert's w13 and w2 have biases (in the blob)
    expert_activation: str = "silu_gated"  # EXPERT_ACTIVATIONS
    swiglu_alpha: float | None = None  # clamped_swiglu: gate * sigmoid(alpha * gate)
    swiglu_limit: float | None = None  # clamped_swiglu: gate clamped above, up on both sides

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # lists from JSON
        if self.sliding_layers is not None:
            object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dense_layers"] = list(self.dense_layers)
        data["sliding_layers"] = _json(self.sliding_layers)
        return data

    def window_of(self, layer: int) -> int | None:
        """The sliding window of a layer's attention (None: it attends to every earlier position)."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    def identity_dict(self) -> dict[str, Any]:
        """to_dict without the family fields left at their defaults (what model_id hashes)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in FAMILY_FIELDS}
        data = self.to_dict()
        return {k: v for k, v in data.items() if k not in defaults or v != _json(defaults[k])}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest.json") -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        missing = (names - set(FAMILY_FIELDS)) - data.keys()
        if missing:
            raise ConfigError(f"{source}: model config lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names if k in data})

    @property
    def moe_layers(self) -> list[int]:
        """The layers whose FFN is routed experts (the store holds experts of these only)."""
        dense = set(self.dense_layers)
        return [layer for layer in range(self.num_layers) if layer not in dense]

    @property
    def rotary_width(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def expert_parameters(self) -> int:
        """Parameters of one expert (w1, w3: F x H; w2: H x F)."""
        return 3 * self.hidden_size * self.intermediate_size


FAMILY_FIELDS = ("family", "attention_bias", "qk_norm", "rotary_dim", "router", "norm_topk_prob", "router_bias",
                 "n_group", "topk_group", "routed_scaling_factor", "dense_layers", "dense_intermediate_size",
                 "shared_expert_intermediate_size", "shared_expert_gate",
                 "attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "rope_interleave",
                 "attention_sinks", "output_bias", "sliding_layers", "rope_type", "rope_factor",
                 "rope_original_max_position_embeddings", "rope_beta_fast", "rope_beta_slow", "rope_truncate",
                 "rope_attention_factor", "softmax_scale_factor", "expert_bias", "expert_activation", "swiglu_alpha", "swiglu_limit")


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
