"""Choosing the next token from the logits: greedy, or temperature + nucleus (top-p) sampling
with a seeded generator so that a seed gives the same text every time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.greedy:
            if not (self.temperature > 0):
                raise ConfigError(f"temperature {self.temperature}: must be > 0 (use greedy for 0)")
            if not (0 < self.top_p <= 1):
                raise ConfigError(f"top_p {self.top_p}: must be in (0, 1]")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] float32 (any device) -> token id."""
        if self.params.greedy:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float().cpu() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < self.params.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
