"""The model's shape, read once from a Hugging Face config and stored in the manifest.

Only the fields the engine needs, with the paper's names where it has them. Reading a Hugging
Face config.json into it is a model family's work (coordinator/families/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

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
