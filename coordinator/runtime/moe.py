"""The sparse MoE block: router -> dispatch -> expert compute -> combine.

Routing is the family's (router.py: softmax or grouped sigmoid, as transformers does it). The
experts come from an ExpertProvider (the cache); this block only says which experts it needs,
in what order it will use them, and when it is done with each. Predictions for the layers ahead
are made here too, from the same hidden state, so that one device->host sync per layer (the
routing plan, routing_plan.py) serves both the routing and the prefetcher. What to do about the
plan is the LayerDispatcher's decision; today's is CacheDispatcher.

Dimension legend: T = tokens, H = hidden size, E = experts per layer, k = experts per token."""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.nn.functional as F

from common.expert_ffn import Linear, dequantize_linear, expert_forward
from common.model_config import ModelConfig
from common.store.blob_layout import ExpertWeights

from . import router, routing_plan
from .rms_norm import rms_norm
from .weights import LayerWeights, shared_expert
from .routing_plan import LayerDispatcher, LayerWork, RoutingPlan


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
    def width_for(self, tokens: int) -> int:
        """Experts guessed per layer ahead for a step of `tokens` tokens."""

    def layers_ahead(self, layer: int) -> list[int]:
        """The later layers that `predict` guesses for, in order."""

    def predict(self, layer: int, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Guessed expert indices [width] (on the device) for each of layers_ahead(layer)."""


class CacheDispatcher:
    """The LayerDispatcher of today's placement: every expert a layer needs is brought into the
    device cache (a hit is used where it lies, a miss is copied in), and the guesses for later
    layers become prefetches."""

    def __init__(self, provider: ExpertProvider, predictor: ExpertPredictor | None) -> None:
        self.provider = provider
        self.predictor = predictor

    def dispatch(self, plan: RoutingPlan) -> LayerWork:
        order = self.provider.begin_layer(plan.layer, plan.needed)
        for later_layer, experts in plan.guesses.items():
            self.provider.prefetch(later_layer, experts)
        return LayerWork(order)


class MoEBlock:
    def __init__(self, config: ModelConfig, layers: list[LayerWeights], provider: ExpertProvider,
                 predictor: ExpertPredictor | None, quantized_linear: Linear = dequantize_linear,
                 counters=None) -> None:
        self.config = config
        self.layers = layers  # per layer: router [E, H] (None in a dense layer), norms, shared expert
        self.provider = provider
        self.predictor = predictor
        self.dispatcher: LayerDispatcher = CacheDispatcher(provider, predictor)
        self.elsewhere = None  # an executor for experts run where they live (placement.py), when placement asks for one
        self.quantized_linear = quantized_linear  # fused CUDA kernels, or plain dequantize+matmul
        self.counters = counters  # ExpertCounters: the wait on runs elsewhere is counted there
        self.routing_hook = None  # a routing trace recorded or replayed here (routing_trace.py), when the engine has one
        self.grouped = None  # kernels/grouped_prefill.GroupedExperts, where it applies (engine.py): the resident prompt
        self._slot_tables: tuple[int, dict[int, torch.Tensor]] | None = None  # (cache version, layer -> slots [E])
        self._uses_pending: list[tuple[int, torch.Tensor]] = []  # (layer, distinct experts used: a device scalar)

    def route(self, layer: int, hidden: torch.Tensor, *,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, fused: bool = False,
              in_order: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """Device work only (a CUDA graph can hold it): hidden [T, H] after attention ->
        (x [T, H] normed MoE input, weights [T, k] float32, plan tensor: see routing_plan.py).
        `out`: the three buffers to write them into (the decoder's static ones), else new tensors.
        `fused` (the decode step on CUDA with Triton, decoder.py; one token, `out` given): out[0]
        already holds the normed input (the decoder's add + norm kernel wrote it), and a softmax
        router without biases runs as one kernel (kernels/decode_fusion.py). `in_order` (k
        experts int64, their top-k positions int64, weights [1, k] float32): filled with the
        chosen experts in ascending order, their positions and weights, as the resident path
        runs them (by that kernel, or by torch.sort where it does not apply)."""
        weights, tokens = self.layers[layer], hidden.shape[0]
        x_out, weights_out, plan_out = out if out is not None else (None, None, None)
        experts_out = None if plan_out is None else plan_out[: tokens * self.config.top_k].view(tokens, -1)
        assert not fused or (out is not None and tokens == 1)
        x = x_out if fused else rms_norm(hidden, weights.post_attention_norm, self.config.rms_norm_eps, out=x_out)
        fusion = _fused_router(self.config, weights) if fused else None
        if fusion is not None:  # one kernel: logits, softmax, top k, renormalised, in_order
            fusion.softmax_router(x, weights.router, self.config.top_k, self.config.norm_topk_prob,
                                  weights_out, experts_out, in_order)
            route_weights, experts = weights_out, experts_out
        else:
            logits = F.linear(x, weights.router, weights.router_logit_bias)  # [T, E]
            route_weights, experts = router.route(logits, self.config, weights.router_bias,
                                                  out=None if out is None else (weights_out, experts_out))
            if in_order is not None:
                torch.sort(experts.view(-1), out=(in_order[0], in_order[1]))
                torch.index_select(route_weights, 1, in_order[1], out=in_order[2])
        guesses = self.predictor.predict(layer, hidden) if self.predictor is not None else []
        return x, route_weights, routing_plan.pack(experts, guesses, out=plan_out)

    def read_plan(self, layer: int, plan: torch.Tensor, tokens: int) -> RoutingPlan:
        """The one device->host sync of a layer: its routing and every guess together."""
        predictor = self.predictor
        layers_ahead = predictor.layers_ahead(layer) if predictor else []
        read = RoutingPlan.read_back(layer, plan, tokens=tokens, top_k=self.config.top_k,
                                     layers_ahead=layers_ahead, width=predictor.width_for(tokens) if predictor else 0)
        if self.routing_hook is None:
            return read
        # Recording keeps the plan; a replay swaps in the trace's experts and guesses, and so what
        # the cache loads and which expert graphs run. The routing weights stay the router's on
        # the device: top-k position p's weight scales whatever expert the plan puts at p.
        return self.routing_hook.on_plan(read, layers_ahead)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The prompt path: hidden [T, H], the residual stream after attention -> the MoE output
        [T, H]. Each expert runs once on all the tokens that chose it. (One token at a time goes
        through decoder.py, which runs the same route and dispatch on static buffers.)"""
        x, weights, plan_tensor = self.route(layer, hidden)
        slots = self._resident_slots(layer)
        if slots is not None and self.grouped.pays(x.shape[0] * self.config.top_k, self.config.num_experts):
            return self._forward_resident(layer, x, weights, plan_tensor, slots)
        plan = self.read_plan(layer, plan_tensor, x.shape[0])
        work = self.dispatcher.dispatch(plan)
        pending = self.start_elsewhere(work, plan, x, weights)
        shared = shared_expert(x, self.layers[layer])  # on the device, beside the routed experts
        out = torch.zeros_like(x) if shared is None else shared
        k = self.config.top_k
        spans, flat = _choices_by_expert(plan.chosen, work.on_device)
        flat = torch.tensor(flat, dtype=torch.long, device=x.device)  # one host->device copy per layer: each expert's (token, position)s
        rows_all, route_weights = flat // k, weights.view(-1)[flat]
        for expert in work.on_device:
            begin, end = spans[expert]
            rows = rows_all[begin:end]
            ys = expert_forward(x[rows], self.provider.get(layer, expert), self.quantized_linear)  # [t, H]
            out.index_add_(0, rows, (ys * route_weights[begin:end, None]).to(out.dtype))
            self.provider.done(layer, expert)
        if pending is not None:
            out += self.result_elsewhere(pending).to(out.device, out.dtype)
        return out

    def _resident_slots(self, layer: int) -> torch.Tensor | None:
        """Each expert's slot [E] (device) when this layer's prompt step can take the grouped
        kernel: it applies (self.grouped), every expert of every layer is resident, and nothing
        needs the routing on the host (no runs elsewhere, no routing trace, no slot emptied
        after use). Else None."""
        provider = self.provider
        if (self.grouped is None or self.elsewhere is not None or self.routing_hook is not None
                or getattr(provider, "forget_after_use", True)):
            return None
        if self._slot_tables is None or self._slot_tables[0] != provider.version:
            slot_map = provider.slot_map(self.config.num_experts) or {}
            device = provider.layer_memory(layer).device
            self._slot_tables = (provider.version, {l: torch.tensor(slots, dtype=torch.long, device=device)
                                                    for l, slots in slot_map.items()})
        return self._slot_tables[1].get(layer)

    def _forward_resident(self, layer: int, x: torch.Tensor, weights: torch.Tensor, plan_tensor: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
        """forward for a resident layer: the grouped kernel over the layer's slot memory, routing
        left on the device (no read-back; the hits, each distinct expert used, counted at
        flush_counts)."""
        k = self.config.top_k
        experts = plan_tensor[: x.shape[0] * k].view(-1, k)
        shared = shared_expert(x, self.layers[layer])
        out = torch.zeros_like(x) if shared is None else shared
        used = self.grouped(x, experts, weights, self.provider.layer_memory(layer), slots, out)
        self._uses_pending.append((layer, used))
        return out

    def flush_counts(self) -> None:
        """Count the hits of the grouped prompt layers since the last flush (one read-back, after
        the prompt's work is issued: Transformer.forward calls it before the logits)."""
        if not self._uses_pending:
            return
        layers = [layer for layer, _ in self._uses_pending]
        counts = torch.stack([used for _, used in self._uses_pending]).tolist()
        self._uses_pending.clear()
        for layer, count in zip(layers, counts):
            self.provider.count_hits(layer, count)

    def start_elsewhere(self, work: LayerWork, plan: RoutingPlan, x: torch.Tensor, weights: torch.Tensor):
        """Start the experts that run where they live on the layer's MoE input x [T, H]; a future
        of their weighted sum [T, H] float32 on the host, or None when every expert runs here."""
        if not work.elsewhere:
            return None
        k = self.config.top_k
        columns = torch.zeros(plan.tokens, len(work.elsewhere), dtype=torch.float32)  # [T, n]
        weights_host = weights.float().cpu()  # [T, k]
        for flat, expert in enumerate(plan.chosen):
            if expert in work.elsewhere:
                columns[flat // k, work.elsewhere.index(expert)] = weights_host[flat // k, flat % k]
        return self.elsewhere.start(plan.layer, work.elsewhere, x.detach().cpu(), columns)

    def result_elsewhere(self, pending) -> torch.Tensor:
        """The weighted sum [T, H] float32 that start_elsewhere's run gives, waited for now (the
        device's experts are issued; a run on this machine's CPU is computed now, on this thread);
        the wait is counted as counters.run_wait_s."""
        started = time.perf_counter()
        out = pending.result()
        if self.counters is not None:
            self.counters.run_wait_s += time.perf_counter() - started
        return out


def _fused_router(config: ModelConfig, weights: LayerWeights):
    """kernels/decode_fusion.py where its router kernel takes this layer's router, else None."""
    from .kernels import decode_fusion  # imports Triton: only asked for on CUDA with it (decoder.py)

    fits = decode_fusion.router_fits(config, weights.router, weights.router_logit_bias, weights.router_bias)
    return decode_fusion if fits else None


def _choices_by_expert(chosen: list[int], experts: list[int]) -> tuple[dict[int, tuple[int, int]], list[int]]:
    """The flat indices t*k + position of every choice of `experts`, grouped by expert in the
    given order, and each expert's [begin, end) span in that list."""
    by_expert: dict[int, list[int]] = {expert: [] for expert in experts}
    for flat_index, expert in enumerate(chosen):
        if expert in by_expert:
            by_expert[expert].append(flat_index)
    spans, flat = {}, []
    for expert in experts:
        spans[expert] = (len(flat), len(flat) + len(by_expert[expert]))
        flat.extend(by_expert[expert])
    return spans, flat
