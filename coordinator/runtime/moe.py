"""The sparse MoE block: router -> dispatch -> expert compute -> combine.

Routing is exactly Mixtral's (softmax in float32 over all experts, top-k, renormalise). The
experts come from an ExpertProvider (the cache); this block only says which experts it needs,
in what order it will use them, and when it is done with each. Predictions for the layers ahead
are made here too, from the same hidden state, so that one device->host sync per layer (the
routing plan, routing_plan.py) serves both the routing and the prefetcher. What to do about the
plan is the LayerDispatcher's decision; today's is CacheDispatcher.

Dimension legend: T = tokens, H = hidden size, E = experts per layer, k = experts per token."""

from __future__ import annotations

from typing import Protocol

import torch

from common.expert_ffn import Linear, dequantize_linear, expert_forward
from common.model_config import ModelConfig
from common.store.blob_layout import ExpertWeights

from . import routing_plan
from .rms_norm import rms_norm
from .routing_plan import LayerDispatcher, RoutingPlan


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


class CacheDispatcher:
    """The LayerDispatcher of today's placement: every expert a layer needs is brought into the
    device cache (a hit is used where it lies, a miss is copied in), and the guesses for later
    layers become prefetches."""

    def __init__(self, provider: ExpertProvider, predictor: ExpertPredictor | None) -> None:
        self.provider = provider
        self.predictor = predictor

    def dispatch(self, plan: RoutingPlan) -> list[int]:
        order = self.provider.begin_layer(plan.layer, plan.needed)
        for later_layer, experts in plan.guesses.items():
            self.provider.prefetch(later_layer, experts)
        return order


class MoEBlock:
    def __init__(self, config: ModelConfig, routers: list[torch.Tensor], post_attention_norms: list[torch.Tensor],
                 provider: ExpertProvider, predictor: ExpertPredictor | None,
                 quantized_linear: Linear = dequantize_linear) -> None:
        self.config = config
        self.routers = routers  # per layer [E, H]
        self.norms = post_attention_norms  # per layer [H]
        self.provider = provider
        self.predictor = predictor
        self.dispatcher: LayerDispatcher = CacheDispatcher(provider, predictor)
        self.quantized_linear = quantized_linear  # fused CUDA kernels, or plain dequantize+matmul

    def route(self, layer: int, hidden: torch.Tensor):
        """Device work only (a CUDA graph can hold it): hidden [T, H] after attention ->
        (x [T, H] normed MoE input, weights [T, k] float32, plan tensor: see routing_plan.py)."""
        x = rms_norm(hidden, self.norms[layer], self.config.rms_norm_eps)
        weights, experts = route(torch.nn.functional.linear(x, self.routers[layer]), self.config.top_k)
        guesses = self.predictor.predict(layer, hidden) if self.predictor is not None else []
        return x, weights, routing_plan.pack(experts, guesses)

    def read_plan(self, layer: int, plan: torch.Tensor, tokens: int) -> RoutingPlan:
        """The one device->host sync of a layer: its routing and every guess together."""
        predictor = self.predictor
        return RoutingPlan.read_back(layer, plan, tokens=tokens, top_k=self.config.top_k,
                                     layers_ahead=predictor.layers_ahead(layer) if predictor else [],
                                     width=predictor.width if predictor else 0)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The prompt path: hidden [T, H], the residual stream after attention -> the MoE output
        [T, H]. Each expert runs once on all the tokens that chose it. (One token at a time goes
        through decoder.py, which runs the same route and dispatch on static buffers.)"""
        x, weights, plan_tensor = self.route(layer, hidden)
        plan = self.read_plan(layer, plan_tensor, x.shape[0])
        order = self.dispatcher.dispatch(plan)
        out = torch.zeros_like(x)
        tokens_of = _tokens_per_expert(plan.chosen, self.config.top_k)
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
