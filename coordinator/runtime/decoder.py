"""The decode step: one token through every layer. The one decode path of the engine, on every
device: captured as CUDA graphs on CUDA, run directly (the same steps, uncaptured) elsewhere or
with `cuda_graphs=False`. The prompt path is `Transformer.forward`.

Run eagerly, a decode step launches some sixty small kernels per layer, and on a fast GPU their
launch cost, not the GPU, bounds the speed. Here each layer's fixed part (residual add,
attention, router, lookahead guesses) is one graph, and the expert FFN on each (cache slot,
top-k position) is one graph that reads the slot at its fixed address. Between them Python does
only what must be decided per token: read the layer's routing plan back (one sync), hand it to
the MoE block's dispatcher (loads, prefetches), and replay the graphs of the slots that hold the
chosen experts.

It reuses the model's own functions for the math, on static buffers (attention runs over the
whole KV capacity, masked past the position). Timing for the benchmark's breakdown lives here
too: `clock`, a PhaseClock, is None except while bench profiles.

Dimension legend: H = hidden size, V = vocabulary, k = experts per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.expert_ffn import expert_forward

from .model import KVCache, Transformer
from .phase_clock import PhaseClock
from .rms_norm import rms_norm
from .weights import shared_expert


class _Direct:
    """Stands in for a CUDA graph off CUDA: `replay()` just runs the work."""

    def __init__(self, work) -> None:
        self.replay = work


MAX_EXPERT_GRAPHS = 2048  # past this, one graph per (layer, slot, position) costs more to capture than it saves


class Decoder:
    def __init__(self, model: Transformer, kv: KVCache, *, cuda_graphs: bool = True,
                 max_expert_graphs: int = MAX_EXPERT_GRAPHS) -> None:
        """`max_expert_graphs`: with more (layer, slot, top-k position) triples than that (many
        experts, many slots), each expert runs from a staging buffer per top-k position instead:
        one graph per (layer, position) copies the chosen slot there on the device (the slot's
        index is a device tensor), then computes; a blob's copy inside HBM, against thousands of
        graphs otherwise."""
        self.model, self.kv = model, kv
        self.capture = cuda_graphs and model.device.type == "cuda"
        self.max_expert_graphs = max_expert_graphs
        self.clock: PhaseClock | None = None
        self.moe, self.cache = model.moe, model.moe.provider
        c, device, dtype = model.config, model.device, model.dtype
        self.config = c
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.full((1,), kv.capacity - 1, dtype=torch.long, device=device)  # scratch while capturing
        self.x = torch.zeros(1, c.hidden_size, dtype=dtype, device=device)  # residual stream entering a layer
        self.h = torch.zeros_like(self.x)  # residual after attention
        self.moe_in = torch.zeros_like(self.x)  # normed input of the experts
        self.out = torch.zeros_like(self.x)  # sum of the experts' weighted outputs
        self.weights = torch.zeros(1, c.top_k, dtype=torch.float32, device=device)
        self.logits = torch.zeros(1, c.vocab_size, dtype=torch.float32, device=device)
        self.plans: list[torch.Tensor] = []
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        with torch.inference_mode():
            self._capture_all()

    # --- what the graphs hold --------------------------------------------------------------

    def _embed(self) -> None:
        self.x.copy_(F.embedding(self.token, self.model.weights.embed))

    def _layer(self, layer: int) -> None:
        if layer > 0:
            torch.add(self.h, self.out, out=self.x)
        weights = self.model.weights.layers[layer]
        normed = rms_norm(self.x, weights.input_norm, self.config.rms_norm_eps)
        self.h.copy_(self.x + self.model.attention(normed, layer, self.position, self.kv))
        if weights.router is None:  # a dense layer: its FFN is all of it, no plan, no experts
            self.out.copy_(self.model.ffn(layer, self.h))
            return
        moe_in, route_weights, plan = self.moe.route(layer, self.h)
        self.moe_in.copy_(moe_in)
        self.weights.copy_(route_weights)
        self.plans[layer].copy_(plan)
        shared = shared_expert(moe_in, weights)  # the experts' outputs are added onto it
        if shared is None:
            self.out.zero_()
        else:
            self.out.copy_(shared)

    def _expert(self, layer: int, slot: int, position: int) -> None:
        ys = expert_forward(self.moe_in, self.cache.slot_weights(layer, slot), self.moe.quantized_linear)  # [1, H]
        self.out.add_((ys * self.weights[:, position : position + 1]).to(self.out.dtype))

    def _staged_expert(self, layer: int, position: int) -> None:
        """The expert in the slot `slot_index[position]` names, through the staging buffer."""
        torch.index_select(self.cache.layer_memory(layer), 0, self.slot_index[position : position + 1],
                           out=self.staging[position : position + 1])  # [1, nbytes]: the blob, on the device
        ys = expert_forward(self.moe_in, self.staging_views[position], self.moe.quantized_linear)  # [1, H]
        self.out.add_((ys * self.weights[:, position : position + 1]).to(self.out.dtype))

    def _head(self) -> None:
        torch.add(self.h, self.out, out=self.x)
        normed = rms_norm(self.x, self.model.weights.norm, self.config.rms_norm_eps)
        self.logits.copy_(F.linear(normed, self.model.weights.lm_head).float())

    # --- capture ---------------------------------------------------------------------------

    def _capture_all(self) -> None:
        c = self.config
        self.moe_layers = set(self.cache.expert_layers)
        device, nbytes = self.model.device, self.cache.layout.nbytes
        self.staged = len(self.moe_layers) * self.cache.slots_per_layer * c.top_k > self.max_expert_graphs
        self.slot_index = torch.zeros(c.top_k, dtype=torch.long, device=device)  # staged path: each position's slot
        with torch.inference_mode(False):
            self.staging = torch.zeros(c.top_k, nbytes, dtype=torch.uint8, device=device) if self.staged else None
        self.staging_views = [self.cache.layout.views(row) for row in self.staging] if self.staged else []
        for layer in range(c.num_layers):  # plan buffers, sized by a dry run of the router
            self.plans.append(torch.zeros_like(self.moe.route(layer, self.h)[2]) if layer in self.moe_layers else None)
        if self.capture:
            self._warm_up()
        self.embed_graph = self._graph(self._embed)
        self.layer_graphs = [self._graph(lambda l=layer: self._layer(l)) for layer in range(c.num_layers)]
        slots = self.cache.slots_per_layer
        if self.staged:
            self.expert_graphs = [
                [self._graph(lambda l=layer, p=position: self._staged_expert(l, p)) for position in range(c.top_k)]
                if layer in self.moe_layers else []
                for layer in range(c.num_layers)
            ]
        else:
            self.expert_graphs = [
                [[self._graph(lambda l=layer, s=slot, p=position: self._expert(l, s, p)) for position in range(c.top_k)]
                 for slot in range(slots)] if layer in self.moe_layers else []
                for layer in range(c.num_layers)
            ]
        self.head_graph = self._graph(self._head)
        if self.capture:
            torch.cuda.synchronize(self.model.device)

    def _warm_up(self) -> None:
        """Run each kind of work once off the main stream: Triton compiles, cuBLAS picks kernels."""
        c = self.config
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS picks kernels) off the main stream
            self._embed()
            for layer in range(c.num_layers):
                self._layer(layer)
                if layer in self.moe_layers:
                    self._staged_expert(layer, 0) if self.staged else self._expert(layer, 0, 0)
            self._head()
        torch.cuda.current_stream(self.model.device).wait_stream(side)

    def _graph(self, work):
        if not self.capture:
            return _Direct(work)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            work()
        return graph

    # --- one token ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] float32 of the token at `position` (a static buffer: read it before the
        next step)."""
        clock = self.clock  # started by whoever set it; each mark charges the time since the last
        self.token.fill_(token)
        self.position.fill_(position)
        self.embed_graph.replay()
        for layer in range(self.config.num_layers):
            self.layer_graphs[layer].replay()
            if clock:
                clock.mark("attention")
            if layer not in self.moe_layers:
                continue
            plan = self.moe.read_plan(layer, self.plans[layer], 1)
            work = self.moe.dispatcher.dispatch(plan)
            pending = self.moe.start_elsewhere(work, plan, self.moe_in, self.weights)  # overlaps the GPU's experts
            if clock:
                clock.mark("routing")
            for expert in work.on_device:
                slot = self.cache.acquire(layer, expert)
                if clock:
                    clock.mark("waiting on copies")
                position = plan.chosen.index(expert)
                if self.staged:
                    self.slot_index[position].fill_(slot)  # a launch with the index as its argument, no sync
                    self.expert_graphs[layer][position].replay()
                else:
                    self.expert_graphs[layer][slot][position].replay()
                self.cache.done(layer, expert)
                if clock:
                    clock.mark("expert compute")
            if pending is not None:
                self.out.add_(self.moe.result_elsewhere(pending).to(self.out.device, self.out.dtype))
                if clock:
                    clock.mark("experts elsewhere")
        self.head_graph.replay()
        if clock:
            clock.mark("other")
        return self.logits
