"""The sparse MoE block: router -> dispatch -> expert compute -> combine.

Routing is exactly Mixtral's (softmax in float32 over all experts, top-k, renormalise). The
experts come from an ExpertProvider (the cache); this block only says which experts it needs,
in what order it will use them, and when it is done with each. Predictions for the layers ahead
are made here too, from the same hidden state, so that one device->host sync per layer serves
both the routing and the prefetcher.

Dimension legend: T = tokens, H = hidden size, E = experts per layer, k = experts per token."""

from __future__ import annotations

from typing import Protocol

import torch

from common.expert_ffn import Linear, dequantize_linear, expert_forward
from common.model_config import ModelConfig
from common.store.blob_layout import ExpertWeights

from .rms_norm import rms_norm


class ExpertProvider(Protocol):
    def begin_layer(self, layer: int, needed: list[int]) -> list[int]:
        """Start loading what is missing; return `needed` in the order to compute it."""

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights on the device, waiting for its load if needed."""

    def done(self, layer: int, expert: int) -> None:
        """The current layer no longer needs this expert (its compute has been issued)."""

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start loading experts predicted for a later layer."""


class ExpertPredictor(Protocol):
    width: int  # experts guessed per layer ahead

    def layers_ahead(self, layer: int) -> list[int]:
        """The later layers that `predict` guesses for, in order."""

    def predict(self, layer: int, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Guessed expert indices [width] (on the device) for each of layers_ahead(layer)."""


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] float32, experts [T, k]) as Mixtral routes."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights, experts


class MoEBlock:
    def __init__(self, config: ModelConfig, routers: list[torch.Tensor], post_attention_norms: list[torch.Tensor],
                 provider: ExpertProvider, predictor: ExpertPredictor | None,
                 quantized_linear: Linear = dequantize_linear) -> None:
        self.config = config
        self.routers = routers  # per layer [E, H]
        self.norms = post_attention_norms  # per layer [H]
        self.provider = provider
        self.predictor = predictor
        self.quantized_linear = quantized_linear  # fused CUDA kernels, or plain dequantize+matmul
        self.clock = None  # a PhaseClock while the benchmark profiles; None otherwise

    def route(self, layer: int, hidden: torch.Tensor):
        """Device work only (a CUDA graph can hold it): hidden [T, H] after attention ->
        (x [T, H] normed MoE input, weights [T, k] float32, plan [T*k + guesses] int64: the chosen
        experts, then the lookahead guesses for the layers ahead)."""
        x = rms_norm(hidden, self.norms[layer], self.config.rms_norm_eps)
        weights, experts = route(torch.nn.functional.linear(x, self.routers[layer]), self.config.top_k)
        predictions = self.predictor.predict(layer, hidden) if self.predictor is not None else []
        plan = torch.cat([experts.view(-1), *predictions]) if predictions else experts.view(-1)
        return x, weights, plan

    def dispatch(self, layer: int, plan: list[int], tokens: int) -> tuple[list[int], list[int]]:
        """Host side of a layer, from the plan read back in one sync: start the loads this layer
        needs, then the prefetches for the layers ahead. Returns (experts in compute order,
        each token's chosen experts flattened [T*k])."""
        count = tokens * self.config.top_k
        chosen = plan[:count]
        order = self.provider.begin_layer(layer, sorted(set(chosen)))
        guesses = plan[count:]
        if guesses:
            width = self.predictor.width
            for n, later_layer in enumerate(self.predictor.layers_ahead(layer)):
                self.provider.prefetch(later_layer, guesses[n * width : (n + 1) * width])
        return order, chosen

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H]: the residual stream after attention -> the MoE output [T, H]."""
        x, weights, plan = self.route(layer, hidden)
        # One device->host sync for this layer: the routing and every guess together.
        order, chosen = self.dispatch(layer, plan.tolist(), x.shape[0])
        clock = self.clock
        if clock:
            clock.mark("routing")
        out = torch.zeros_like(x)
        if x.shape[0] == 1:  # decode: one token, no gather/scatter
            for expert in order:
                position = chosen.index(expert)
                expert_weights = self.provider.get(layer, expert)
                if clock:
                    clock.mark("waiting on copies")
                ys = expert_forward(x, expert_weights, self.quantized_linear)  # [1, H]
                out += (ys * weights[:, position : position + 1]).to(out.dtype)
                self.provider.done(layer, expert)
                if clock:
                    clock.mark("expert compute")
            return out
        tokens_of = _tokens_per_expert(chosen, self.config.top_k)
        for expert in order:
            token_index, slot_index = tokens_of[expert]
            rows = torch.tensor(token_index, device=x.device)
            ys = expert_forward(x[rows], self.provider.get(layer, expert), self.quantized_linear)  # [t, H]
            ys = ys * weights[rows, torch.tensor(slot_index, device=x.device), None]
            out.index_add_(0, rows, ys.to(out.dtype))
            self.provider.done(layer, expert)
        return out


def _tokens_per_expert(chosen: list[int], top_k: int) -> dict[int, tuple[list[int], list[int]]]:
    """expert -> (token indices, position of the expert in each token's top-k)."""
    routed: dict[int, tuple[list[int], list[int]]] = {}
    for flat_index, expert in enumerate(chosen):
        tokens, positions = routed.setdefault(expert, ([], []))
        tokens.append(flat_index // top_k)
        positions.append(flat_index % top_k)
    return routed
