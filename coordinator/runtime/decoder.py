"""The decode step: one token through every layer. The one decode path of the engine, on every
device: captured as CUDA graphs on CUDA, run directly (the same steps, uncaptured) elsewhere or
with `cuda_graphs=False`. The prompt path is `Transformer.forward`.

Run eagerly, a decode step launches a few dozen small kernels per layer, and on a fast GPU their
launch cost, not the GPU, bounds the speed; even inside a graph each costs a microsecond or two,
so the math writes into these buffers in place where it can, without a copy after. Here each layer's fixed part (residual add,
attention, router, lookahead guesses) is one graph, and the expert FFN on each (cache slot,
top-k position) is one graph that reads the slot at its fixed address. Between them Python does
only what must be decided per token: read the layer's routing plan back (one sync), hand it to
the MoE block's dispatcher (loads, prefetches), and replay the graphs of the slots that hold the
chosen experts. Where the in-place slot kernels apply (kernels/slot_experts.py: CUDA, 2- or
4-bit HQQ), a layer's on-device experts instead run in one graph per count of them: their slots
and top-k positions go to the device in one small copy from a pinned buffer, and the kernels
read each blob in place (no graph per slot, no staging copy).

When every expert of every layer is resident (K slots = E experts, bench's `resident` mode) and
nothing runs elsewhere (and no routing trace is recorded or replayed), there is nothing to decide
per token: the layer graph maps the chosen
experts to their slots on the device (an expert -> slot table) and the experts run from there,
through kernels that read each blob in place by its slot index (kernels/slot_experts.py; a
staging copy where those kernels do not apply, the slot views themselves off CUDA). Then the
whole token, every layer and the head, is one CUDA graph, with no read-back at all.

On CUDA with Triton the step's glue runs fused (kernels/decode_fusion.py): each residual add
with the RMSNorm after it is one kernel (the first layer's norm alone too; a dense layer's FFN
keeps its own), and a softmax router without biases one more (its logits, softmax, top k and
weights, and for the resident path the experts in index order): in bf16 a MoE layer's ~15
launches of glue around attention (~17 resident: the sort, the weights' gather) become 3.
On the resident path through the slot kernels (v1-v3) the glue around them goes too: the MoE
input norm also writes the kernels' float32 input and its sums per 16 columns, v1 sums its
hidden activations in the w13 kernel, and (no shared expert) the layer's w2 partial sums stay
unsummed, self.out unwritten: the next layer's add + norm, or the head's, sums and rounds them
(_prepares_input, _sums_partials): seven launches fewer a layer in bf16/fp16 (the copy to
float32, two sums, the partials' sum, its cast, out.zero_ and out.add_), six in float32.
MOE_EDGE_FUSED_DECODE=0, read when a Decoder is made, keeps torch's ops, which run everywhere
else and are the kernels' reference. The prompt path never fuses.

It reuses the model's own functions for the math, on static buffers (attention runs over the
whole KV capacity, masked past the position, except through the fused attention kernels on CUDA,
which read only the positions so far). Timing for the benchmark's breakdown lives here too:
`clock`, a PhaseClock, is None except while bench profiles.

Dimension legend: H = hidden size, V = vocabulary, k = experts per token."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from common.expert_ffn import expert_forward

from .kernels import slot_experts_for, switched_on

from .model import KVCache, StepTables, Transformer
from .phase_clock import PhaseClock
from .rms_norm import rms_norm
from .weights import shared_expert


class _Direct:
    """Stands in for a CUDA graph off CUDA: `replay()` just runs the work."""

    def __init__(self, work) -> None:
        self.replay = work


MAX_EXPERT_GRAPHS = 2048  # past this, one graph per (layer, slot, position) costs more to capture than it saves


def _decode_fusion(device: torch.device):
    """kernels/decode_fusion.py where the decode step's glue runs fused (CUDA with Triton, unless
    MOE_EDGE_FUSED_DECODE=0), else None: torch's ops."""
    if not switched_on(device, "MOE_EDGE_FUSED_DECODE"):
        return None
    from .kernels import decode_fusion

    return decode_fusion


class Decoder:
    def __init__(self, model: Transformer, kv: KVCache, *, cuda_graphs: bool = True,
                 max_expert_graphs: int = MAX_EXPERT_GRAPHS, resident_path: bool = True,
                 slot_kernels: bool = True) -> None:
        """`max_expert_graphs`: with more (layer, slot, top-k position) triples than that (many
        experts, many slots), each expert runs from a staging buffer per top-k position instead:
        one graph per (layer, position) copies the chosen slot there on the device (the slot's
        index is a device tensor), then computes; a blob's copy inside HBM, against thousands of
        graphs otherwise. `resident_path=False` keeps the per-layer path even when every expert is
        resident (tests compare the two); `slot_kernels=False` keeps the graph per (layer, slot,
        position) or the staging path where the in-place slot kernels would apply."""
        self.model, self.kv = model, kv
        self.resident_path = resident_path
        self.use_slot_kernels = slot_kernels
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
        self.fusion = _decode_fusion(device)  # the fused kernels module, or None
        self.normed = torch.zeros_like(self.x)  # fused: the normed input of attention, then of the head
        # fused, resident: the chosen experts in index order [k], their top-k positions [k], their weights [1, k]
        self.in_order = (torch.zeros(c.top_k, dtype=torch.long, device=device),
                         torch.zeros(c.top_k, dtype=torch.long, device=device),
                         torch.zeros(1, c.top_k, dtype=torch.float32, device=device))
        self.weights = torch.zeros(1, c.top_k, dtype=torch.float32, device=device)
        self.logits = torch.zeros(1, c.vocab_size, dtype=torch.float32, device=device)
        self.plans: list[torch.Tensor] = []
        self.step_tables = StepTables(model, kv.capacity)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        with torch.inference_mode():
            self._capture_all()

    # --- what the graphs hold --------------------------------------------------------------

    def _embed(self) -> None:
        torch.index_select(self.model.weights.embed, 0, self.token, out=self.x)  # the token's embedding row
        self.step_tables.fill(self.position)  # the rotary rows and masks every layer of this token reads

    def _add_norm(self, a: torch.Tensor | None, b: torch.Tensor, weight: torch.Tensor, total: torch.Tensor,
                  after: int | None = None) -> torch.Tensor:
        """total = a + b (a None: total holds the sum already) -> rms_norm(total): one kernel when
        fused (into self.normed), else torch.add and rms_norm.py. `after`: the layer whose output
        b is; where its experts left their w2 partial sums unsummed (_sums_partials), b is
        those, summed and rounded inside the same kernel."""
        eps = self.config.rms_norm_eps
        if self.fusion is not None:
            if a is None:
                self.fusion.add_rms_norm(total, None, weight, eps, None, self.normed)
            elif after is not None and self._sums_partials(after):
                self.fusion.add_rms_norm(a, self.slot_experts.partial, weight, eps, total, self.normed, partials=True)
            else:
                self.fusion.add_rms_norm(a, b, weight, eps, total, self.normed)
            return self.normed
        if a is not None:
            torch.add(a, b, out=total)
        return rms_norm(total, weight, eps)

    def _prepares_input(self, layer: int) -> bool:
        """Whether the layer's MoE input norm also writes the slot kernels' float32 input and its
        sums (fused resident slot path: no copy, no sum before the w13 launch)."""
        return self.glue_fused and layer in self.moe_layers and self.model.weights.layers[layer].router is not None

    def _sums_partials(self, layer: int) -> bool:
        """Whether the layer's experts leave self.out unwritten and their w2 partial sums
        (slot_experts.partial) for the next add + norm to sum: _prepares_input, and no shared
        expert (out would otherwise hold it first)."""
        return self._prepares_input(layer) and self.model.weights.layers[layer].shared_w13 is None

    def _layer(self, layer: int) -> None:
        weights = self.model.weights.layers[layer]
        normed = self._add_norm(self.h if layer > 0 else None, self.out, weights.input_norm, self.x,
                                after=layer - 1 if layer > 0 else None)
        attention = self.model.attention(normed, layer, self.position, self.kv, self.step_tables)  # [1, H]
        fused = self.fusion is not None and weights.router is not None
        if fused:  # the residual add and the experts' input norm in one kernel; route takes moe_in as it is
            prepared = (self.slot_experts.x, self.slot_experts.x_sums) if self._prepares_input(layer) else (None, None)
            self.fusion.add_rms_norm(self.x, attention, weights.post_attention_norm, self.config.rms_norm_eps,
                                     self.h, self.moe_in, *prepared)
        else:
            torch.add(self.x, attention, out=self.h)
        if weights.router is None:  # a dense layer: its FFN is all of it, no plan, no experts
            self.out.copy_(self.model.ffn(layer, self.h))
            return
        self.moe.route(layer, self.h, out=(self.moe_in, self.weights, self.plans[layer]),  # written in place
                       fused=fused, in_order=self.in_order if fused and self.resident else None)
        if shared_expert(self.moe_in, weights, out=self.out) is None and not self._sums_partials(layer):
            self.out.zero_()  # the experts' outputs are added onto it

    def _expert(self, layer: int, slot: int, position: int) -> None:
        ys = expert_forward(self.moe_in, self.cache.slot_weights(layer, slot), self.moe.quantized_linear)  # [1, H]
        self.out.add_((ys * self.weights[:, position : position + 1]).to(self.out.dtype))

    def _staged_expert(self, layer: int, position: int) -> None:
        """The expert in the slot `slot_index[position]` names, through the staging buffer."""
        torch.index_select(self.cache.layer_memory(layer), 0, self.slot_index[position : position + 1],
                           out=self.staging[position : position + 1])  # [1, nbytes]: the blob, on the device
        ys = expert_forward(self.moe_in, self.staging_views[position], self.moe.quantized_linear)  # [1, H]
        self.out.add_((ys * self.weights[:, position : position + 1]).to(self.out.dtype))

    def _slot_experts(self, layer: int, count: int) -> None:
        """The first `count` on-device experts of the layer, by the slots and top-k positions
        the step copied to `slot_positions`, read in place: what a per-count graph holds."""
        k = self.config.top_k
        weights = torch.index_select(self.weights, 1, self.slot_positions[k : k + count])  # [1, count]
        self.counted_slot_experts[count - 1](self.moe_in, self.cache.layer_memory(layer),
                                             self.slot_positions[:count], weights, self.out)

    def _resident_experts(self, layer: int) -> None:
        """Every expert resident: the chosen experts' slots are their own indices where each
        expert sits in the slot of its index (as load_all leaves them), else come from the expert
        -> slot table on the device. They run in ascending expert order, as the per-layer path runs them, so that
        off CUDA both paths add the same numbers in the same order."""
        k = self.config.top_k
        in_order = None  # fused: the router wrote the experts in index order, their positions and weights
        if self.fusion is not None:
            experts, positions, in_order = self.in_order
        else:
            experts, positions = torch.sort(self.plans[layer][:k])  # [k] each: experts, their top-k positions
        slots = experts  # where each expert sits in the slot of its own index (as load_all leaves them)
        if layer in self.expert_slots:
            slots = torch.index_select(self.expert_slots[layer], 0, experts, out=self.slot_index)
        memory = self.cache.layer_memory(layer)
        if self.slot_experts is not None:  # in place, all k experts in two launches
            weights = in_order if in_order is not None else torch.index_select(self.weights, 1, positions)  # [1, k] in slots' order
            if self._prepares_input(layer):  # x and its sums written by the MoE input norm
                self.slot_experts.gate_up_prepared(memory, slots)
            else:
                self.slot_experts.gate_up(self.moe_in, memory, slots)
            if self._sums_partials(layer):  # the next add + norm sums the partials
                self.slot_experts.down_kernel(memory, slots, weights)
            else:
                self.slot_experts.down(memory, slots, weights, self.out)
            return
        for rank in range(k):
            if self.model.device.type == "cuda":  # the blob by its device index, through the staging buffer
                torch.index_select(memory, 0, slots[rank : rank + 1], out=self.staging[rank : rank + 1])
                ys = expert_forward(self.moe_in, self.staging_views[rank], self.moe.quantized_linear)  # [1, H]
                weight = (in_order[:, rank : rank + 1] if in_order is not None
                          else torch.index_select(self.weights, 1, positions[rank : rank + 1]))  # [1, 1]
                self.out.add_((ys * weight).to(self.out.dtype))
            else:  # off CUDA the host reads the index for free: the slot's own views
                self._expert(layer, int(slots[rank]), int(positions[rank]))

    def _head(self) -> None:
        normed = self._add_norm(self.h, self.out, self.model.weights.norm, self.x, after=self.config.num_layers - 1)
        self.logits.copy_(F.linear(normed, self.model.weights.lm_head))  # to float32 on the way

    # --- capture ---------------------------------------------------------------------------

    def _all_resident(self) -> dict[int, list[int]] | None:
        """The expert -> slot table of every layer, when the decode step needs no routing read-back:
        every expert resident, none run elsewhere, no slot emptied after use."""
        if (not self.resident_path or self.moe.elsewhere is not None or self.cache.forget_after_use
                or self.moe.routing_hook is not None):  # a trace records or replays read-backs
            return None
        return self.cache.slot_map(self.config.num_experts)

    def _capture_all(self) -> None:
        c = self.config
        self.moe_layers = set(self.cache.expert_layers)
        device, nbytes = self.model.device, self.cache.layout.nbytes
        self.cache_version = self.cache.version
        slot_map = self._all_resident()
        self.resident = slot_map is not None
        # A slot per expert but not all loaded yet: checked each step until they are (cheap).
        self.may_become_resident = (not self.resident and self.resident_path and self.moe.elsewhere is None
                                    and not self.cache.forget_after_use and self.moe.routing_hook is None
                                    and self.cache.slots_per_layer >= c.num_experts)
        # expert -> slot tables on the device, of the layers where an expert is not in the slot of its index
        self.expert_slots = {layer: torch.tensor(slots, dtype=torch.long, device=device)
                             for layer, slots in (slot_map or {}).items() if slots != list(range(len(slots)))}
        self.slot_experts = None
        fused = getattr(self.moe.quantized_linear, "fused", False)
        if self.resident and fused:
            self.slot_experts = slot_experts_for(device, self.cache.layout, c.top_k, self.model.dtype)
        # The fused resident slot path: the MoE input norm writes the slot kernels' input, and
        # (no shared expert) the next add + norm sums their w2 partials, so self.out is not written
        # (_prepares_input, _sums_partials). Only here: every reader of self.out is on this path
        # (the next layer's norm, the head), none elsewhere (no experts run elsewhere).
        # MOE_EDGE_FUSED_GLUE=0 keeps the slot kernels' own copy, sums and add (to compare).
        self.glue_fused = (self.resident and self.fusion is not None and self.slot_experts is not None
                           and self.slot_experts.takes_prepared_input
                           and os.environ.get("MOE_EDGE_FUSED_GLUE", "1") != "0")
        # Offloaded: one set of in-place kernels per count of on-device experts (1..k), when they apply.
        self.counted_slot_experts = None
        if not self.resident and fused and self.use_slot_kernels:
            kernels = [slot_experts_for(device, self.cache.layout, n, self.model.dtype) for n in range(1, c.top_k + 1)]
            self.counted_slot_experts = kernels if kernels[0] is not None else None
        if self.counted_slot_experts is not None:
            # per layer: the on-device experts' slots then their top-k positions, written by the host
            # (a layer's buffer is rewritten only a token later, long after its copy ran)
            self.host_slot_positions = torch.zeros(c.num_layers, 2 * c.top_k, dtype=torch.long, pin_memory=device.type == "cuda")
            self.host_slot_positions_np = self.host_slot_positions.numpy()
            self.slot_positions = torch.zeros(2 * c.top_k, dtype=torch.long, device=device)
        self.staged = (not self.resident and self.counted_slot_experts is None
                       and len(self.moe_layers) * self.cache.slots_per_layer * c.top_k > self.max_expert_graphs)
        staging = self.staged or (self.resident and self.slot_experts is None and device.type == "cuda")
        self.slot_index = torch.zeros(c.top_k, dtype=torch.long, device=device)  # each position's slot, on the device
        with torch.inference_mode(False):
            self.staging = torch.zeros(c.top_k, nbytes, dtype=torch.uint8, device=device) if staging else None
        self.staging_views = [self.cache.layout.views(row) for row in self.staging] if staging else []
        self.plans = []
        for layer in range(c.num_layers):  # plan buffers, sized by a dry run of the router
            self.plans.append(torch.zeros_like(self.moe.route(layer, self.h)[2]) if layer in self.moe_layers else None)
        if self.capture:
            self._warm_up()
        self.embed_graph = self._graph(self._embed)
        self.layer_graphs = [self._graph(lambda l=layer: self._layer(l)) for layer in range(c.num_layers)]
        self.head_graph = self._graph(self._head)
        slots = self.cache.slots_per_layer
        self.token_graph = None
        if self.resident:
            # One graph per layer's experts (for the phase clock's breakdown), and the whole token.
            self.expert_graphs = [self._graph(lambda l=layer: self._resident_experts(l)) if layer in self.moe_layers
                                  else None for layer in range(c.num_layers)]
            self.token_graph = self._graph(self._token)
        elif self.counted_slot_experts is not None:
            self.expert_graphs = [
                [self._graph(lambda l=layer, n=count: self._slot_experts(l, n)) for count in range(1, c.top_k + 1)]
                if layer in self.moe_layers else []
                for layer in range(c.num_layers)
            ]
        elif self.staged:
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
                    if self.resident:
                        self._resident_experts(layer)
                    elif self.counted_slot_experts is not None:
                        for count in range(1, c.top_k + 1):
                            self._slot_experts(layer, count)
                    else:
                        self._staged_expert(layer, 0) if self.staged else self._expert(layer, 0, 0)
            self._head()
        torch.cuda.current_stream(self.model.device).wait_stream(side)

    def _graph(self, work):
        if not self.capture:
            return _Direct(work)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the fetch loop's thread may touch CUDA meanwhile (an expert host's run
        # results, a staging copy's sync); under the default global mode that invalidates the
        # capture (seen on an H200 with experts run on a host through a link proxy).
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            work()
        return graph

    def _token(self) -> None:
        """The whole token when every expert is resident: what the whole-token graph holds."""
        self._embed()
        for layer in range(self.config.num_layers):
            self._layer(layer)
            if layer in self.moe_layers:
                self._resident_experts(layer)
        self._head()

    # --- one token ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] float32 of the token at `position` (a static buffer: read it before the
        next step)."""
        clock = self.clock  # started by whoever set it; each mark charges the time since the last
        if self.resident and self.cache.version != self.cache_version:  # a slot changed hands since the capture
            self._capture_all()
        elif self.may_become_resident and self._all_resident() is not None:  # K = E and the last expert came in
            self._capture_all()
        self.token.fill_(token)
        self.position.fill_(position)
        if self.resident:
            self._step_resident(clock)
            return self.logits
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
            if self.counted_slot_experts is not None:
                self._run_slot_experts(layer, plan, work.on_device, clock)
            else:
                self._run_expert_graphs(layer, plan, work.on_device, clock)
            if pending is not None:
                self.out.add_(self.moe.result_elsewhere(pending).to(self.out.device, self.out.dtype))
                if clock:
                    clock.mark("experts elsewhere")
        self.head_graph.replay()
        if clock:
            clock.mark("other")
        return self.logits

    def _run_expert_graphs(self, layer: int, plan, on_device: list[int], clock: PhaseClock | None) -> None:
        """The layer's on-device experts one graph each: per (slot, position), or staged per position."""
        for expert in on_device:
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

    def _run_slot_experts(self, layer: int, plan, on_device: list[int], clock: PhaseClock | None) -> None:
        """The layer's on-device experts through one per-count graph of the in-place kernels."""
        if not on_device:
            return
        k, row = self.config.top_k, self.host_slot_positions_np[layer]
        for rank, expert in enumerate(on_device):
            row[rank] = self.cache.acquire(layer, expert)  # the stream waits for its copy, if any
            row[k + rank] = plan.chosen.index(expert)
        if clock:
            clock.mark("waiting on copies")
        self.slot_positions.copy_(self.host_slot_positions[layer], non_blocking=True)
        self.expert_graphs[layer][len(on_device) - 1].replay()
        for expert in on_device:
            self.cache.done(layer, expert)
        if clock:
            clock.mark("expert compute")

    def _step_resident(self, clock: PhaseClock | None) -> None:
        """Every expert resident: one replay and no read-back; while the clock runs, the same
        work as separate graphs so that each phase can be timed."""
        self.cache.count_resident_uses(self.config.top_k)  # a token uses top_k experts of each layer, all hits
        if clock is None:
            self.token_graph.replay()
            return
        self.embed_graph.replay()
        for layer in range(self.config.num_layers):
            self.layer_graphs[layer].replay()
            clock.mark("attention")
            if layer in self.moe_layers:
                self.expert_graphs[layer].replay()
                clock.mark("expert compute")
        self.head_graph.replay()
        clock.mark("other")
