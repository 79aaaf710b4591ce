"""The routing plan of one layer: the one place where the device tells the host what a layer
needs, and the seam where the host decides what to do about it.

On the device, a layer's router output (the experts each token chose) and the lookahead's
guesses for the layers ahead are packed into one int64 tensor (`pack`), so that a single
device->host read-back per layer serves both routing and prefetch. On the host, `RoutingPlan`
unpacks it. A `LayerDispatcher` takes the plan and starts what the layer needs (loads into the
cache, prefetches for later layers) and returns the order to compute the experts in: placement
per miss (copy it, or run it where it lives) and batched prompts hook in here.

Dimension legend: T = tokens, k = experts per token, N = experts guessed per layer ahead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


def pack(experts: torch.Tensor, guesses: list[torch.Tensor], *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Device side: experts [T, k] and one [N] guess per layer ahead -> plan [T*k + D*N] int64.
    `out`: a plan buffer whose first T*k entries `experts` already is (the router wrote them
    there); the guesses go after them."""
    if out is None:
        return torch.cat([experts.view(-1), *guesses]) if guesses else experts.view(-1)
    count = experts.numel()
    assert experts.data_ptr() == out.data_ptr() and out.numel() == count + sum(g.numel() for g in guesses)
    if guesses:
        torch.cat(guesses, out=out[count:])
    return out


@dataclass(frozen=True)
class RoutingPlan:
    layer: int
    tokens: int
    chosen: list[int]  # [T*k]: token t's experts are chosen[t*k:(t+1)*k], best first
    guesses: dict[int, list[int]]  # later layer -> experts the lookahead expects it to want

    @classmethod
    def read_back(cls, layer: int, plan: torch.Tensor, *, tokens: int, top_k: int,
                  layers_ahead: list[int], width: int) -> "RoutingPlan":
        """Host side: the layer's plan tensor (one sync) -> the plan."""
        values = plan.tolist()
        count = tokens * top_k
        rest = values[count:]
        guesses = {later: rest[n * width:(n + 1) * width] for n, later in enumerate(layers_ahead) if rest}
        return cls(layer, tokens, values[:count], guesses)

    @property
    def needed(self) -> list[int]:
        """The distinct experts this layer uses, in index order."""
        return sorted(set(self.chosen))


@dataclass(frozen=True)
class LayerWork:
    """Where a layer's experts run: `on_device` from cache slots, in this order; `elsewhere` where
    they live (the coordinator's CPU, or an expert host), their weighted outputs added after."""

    on_device: list[int]
    elsewhere: list[int] = field(default_factory=list)


class LayerDispatcher(Protocol):
    def dispatch(self, plan: RoutingPlan) -> LayerWork:
        """Start what the layer needs now (loads into the cache for the experts that run on the
        device) and what the guesses say later layers will need; say where each of
        `plan.needed` runs."""
