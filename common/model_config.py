"""The model's shape, read once from a Hugging Face config and stored in the manifest.

Only the fields the engine needs, with the paper's names where it has them. Parsing goes
through transformers' own `MixtralConfig`, so defaults and legacy keys (a top-level
`rope_theta`) mean exactly what they mean to transformers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral",)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # one expert's FFN width
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

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        from transformers import MixtralConfig

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (moe-edge runs {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            config = MixtralConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: not a valid Mixtral config: {err}") from None
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if rope_theta is None:
            raise ConfigError(f"{source}: no rope_theta")
        eos = config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=config.sliding_window,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            bos_token_id=config.bos_token_id,
            eos_token_id=eos,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest.json") -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ConfigError(f"{source}: model config lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})

    @property
    def expert_parameters(self) -> int:
        """Parameters of one expert (w1, w3: F x H; w2: H x F)."""
        return 3 * self.hidden_size * self.intermediate_size
