"""What an expert does between its two matrices: gate_up = x W13 (+ b13) [T, 2F] -> [T, F].

    silu_gated      Mixtral and the Llama-descended families: SiLU(gate) * up.
    clamped_swiglu  GPT-OSS: gate clamped to at most `limit`, up to [-limit, limit], then
                    gate * sigmoid(alpha * gate) * (up + 1).

Both read gate_up as [gate | up] halves (the store's w13 = [w1; w3]; pack de-interleaves
GPT-OSS's alternating columns). The activation is part of the blob layout, so whoever holds an
expert's blob and the store's manifest can run it; knows nothing of where the matmuls run.

Shapes: T = tokens, F = expert FFN width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .model_config import EXPERT_ACTIVATIONS, ModelConfig


@dataclass(frozen=True)
class ExpertActivation:
    kind: str = "silu_gated"  # EXPERT_ACTIVATIONS
    alpha: float | None = None  # clamped_swiglu only
    limit: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"expert activation {self.kind!r} is not one of {', '.join(EXPERT_ACTIVATIONS)}")
        if self.kind == "clamped_swiglu" and (self.alpha is None or self.limit is None):
            raise ConfigError("expert activation clamped_swiglu needs its alpha and limit")

    @classmethod
    def of(cls, config: ModelConfig) -> "ExpertActivation":
        if config.expert_activation == "silu_gated":
            return cls()
        return cls(config.expert_activation, config.swiglu_alpha, config.swiglu_limit)

    @property
    def is_default(self) -> bool:
        return self == ExpertActivation()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "alpha": self.alpha, "limit": self.limit}

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2F] -> [T, F]."""
        gate, up = gate_up.chunk(2, dim=-1)  # [T, F] each
        if self.kind == "silu_gated":
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
