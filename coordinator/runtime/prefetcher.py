"""Speculative expert loading (Eliseev & Mazur 2023; Pre-gated MoE, Hwang et al. 2024): the
routers of the next D layers, applied to the current hidden state, guess which experts those
layers will want, and the cache starts loading them before they are asked for.

It works because the residual stream changes little from one layer to the next. No retraining:
we reuse each later layer's own post-attention norm and router.

Dimension legend: T = tokens, H = hidden size, E = experts per layer, N = experts guessed per layer."""

from __future__ import annotations

import torch

from .rms_norm import rms_norm


class RouterLookahead:
    def __init__(self, routers: list[torch.Tensor], post_attention_norms: list[torch.Tensor], eps: float,
                 *, depth: int, experts_per_layer: int) -> None:
        self.routers = routers  # per layer [E, H]
        self.norms = post_attention_norms  # per layer [H]
        self.eps = eps
        self.depth = depth
        self.width = experts_per_layer

    def layers_ahead(self, layer: int) -> list[int]:
        return list(range(layer + 1, min(layer + 1 + self.depth, len(self.routers))))

    def predict(self, layer: int, hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden [T, H] after layer `layer`'s attention -> [N] expert indices for each layer
        ahead. With several tokens (prefill), the guess is the experts with the most routing mass."""
        guesses = []
        for later in self.layers_ahead(layer):
            x = rms_norm(hidden, self.norms[later], self.eps)
            probs = torch.softmax(torch.nn.functional.linear(x, self.routers[later]).float(), dim=-1)  # [T, E]
            guesses.append(torch.topk(probs.sum(dim=0), self.width).indices)  # [N]
        return guesses
