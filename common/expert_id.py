"""The one key for an expert, used in the cache, the store, the proto, the logs and the metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ExpertId:
    layer: int
    expert: int

    def __str__(self) -> str:
        return f"layer {self.layer} expert {self.expert}"

    @property
    def tensor_name(self) -> str:
        """Name of this expert's blob inside an experts-*.safetensors file."""
        return f"layers.{self.layer}.experts.{self.expert}"
