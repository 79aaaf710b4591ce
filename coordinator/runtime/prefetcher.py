"""Speculative expert loading (Eliseev & Mazur 2023; Pre-gated MoE, Hwang et al. 2024): the
routers of the next D layers that have experts, applied to the current hidden state, guess which
experts those layers will want, and the cache starts loading them before they are asked for.

It works because the residual stream changes little from one layer to the next. No retraining:
we reuse each later layer's own post-attention norm and router, and rank experts as that
layer's router does (router.choice_scores). Dense layers hold no experts and are skipped.

Dimension legend: T = tokens, H = hidden size, E = experts per layer, N = experts guessed per layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.model_config import ModelConfig

from . import router
from .rms_norm import rms_norm
from .weights import LayerWeights


class RouterLookahead:
    def __init__(self, config: ModelConfig, layers: list[LayerWeights], *, depth: int, experts_per_layer: int,
                 prompt_experts_per_layer: int | None = None) -> None:
        """`prompt_experts_per_layer`: guesses per layer ahead for a prompt step (default the same
        as a decode step's). A prompt's tokens use most experts of every layer, so the engine
        guesses as many as a layer has slots: the next layer's copies then overlap this one's compute."""
        self.config = config
        self.layers = layers  # per layer: router [E, H] (None in a dense layer), post-attention norm [H]
        self.depth = depth
        self.width = experts_per_layer
        self.prompt_width = min(prompt_experts_per_layer or experts_per_layer, config.num_experts)
        self._moe_layers = [index for index, weights in enumerate(layers) if weights.router is not None]

    def width_for(self, tokens: int) -> int:
        return self.width if tokens == 1 else self.prompt_width

    def layers_ahead(self, layer: int) -> list[int]:
        return [later for later in self._moe_layers if later > layer][: self.depth]

    def predict(self, layer: int, hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden [T, H] after layer `layer`'s attention -> [N] expert indices for each layer
        ahead. With several tokens (prefill), the guess is the experts with the most score."""
        guesses = []
        for later in self.layers_ahead(layer):
            weights = self.layers[later]
            x = rms_norm(hidden, weights.post_attention_norm, self.config.rms_norm_eps)
            logits = F.linear(x, weights.router, weights.router_logit_bias)
            scores = router.choice_scores(logits, self.config, weights.router_bias)  # [T, E]
            guesses.append(torch.topk(scores.sum(dim=0), self.width_for(hidden.shape[0])).indices)  # [N]
        return guesses
