"""The GPU expert cache. Knows nothing about gRPC or files: it maps an expert to one of K
preallocated device slots of its layer, fills slots through an ExpertLoader, evicts the least
recently used expert that the current layer no longer needs, and counts what happened
(counters.py).

All bookkeeping runs on the GPU loop's thread; only the byte moves run elsewhere (the loader)."""

from __future__ import annotations

import concurrent.futures
import time
from collections import OrderedDict

import torch

from common.errors import ConfigError, HostError
from common.expert_id import ExpertId
from common.store.blob_layout import BlobLayout, ExpertWeights

from .counters import ExpertCounters
from .expert_loader import ExpertLoader


class _Slot:
    __slots__ = ("expert", "ticket", "ready", "free", "prefetched_unused", "loading_for_prefetch")

    def __init__(self, cuda: bool) -> None:
        self.expert: int | None = None
        self.ticket: concurrent.futures.Future | None = None  # a load in flight
        self.ready = torch.cuda.Event() if cuda else None  # recorded behind the copy into the slot
        self.free = torch.cuda.Event() if cuda else None  # recorded behind the last compute reading it
        self.prefetched_unused = False  # for the counters: brought in by a prefetch, not used yet
        self.loading_for_prefetch = False  # the load in flight was started by a prefetch


class _LayerSlots:
    def __init__(self, count: int, cuda: bool) -> None:
        self.slots = [_Slot(cuda) for _ in range(count)]
        self.slot_of: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # resident or loading experts, oldest first


class ExpertCache:
    def __init__(self, *, layout: BlobLayout, num_layers: int, slots_per_layer: int, device: torch.device,
                 loader: ExpertLoader, load_timeout_s: float = 300.0, forget_after_use: bool = False,
                 counters: ExpertCounters | None = None, expert_layers: list[int] | None = None) -> None:
        """`forget_after_use` empties a slot as soon as its expert is used: no caching at all,
        every use a fresh copy (the naive baseline of the benchmark). `counters`: where to
        count (the engine's lifetime counters, kept across caches); a fresh set by default.
        `expert_layers`: the layers that have experts (default all); dense layers get no slots."""
        if slots_per_layer < 1:
            raise ConfigError(f"--cache-experts {slots_per_layer}: needs at least 1 slot per layer")
        self.layout = layout
        self.device = device
        self.loader = loader
        self.load_timeout_s = load_timeout_s
        self.cuda = device.type == "cuda"
        self.slots_per_layer = slots_per_layer
        self.forget_after_use = forget_after_use
        # Normal tensors even if the engine is made under inference_mode: the loader writes them
        # from other threads, where an inference tensor would refuse in-place updates.
        self.expert_layers = list(range(num_layers)) if expert_layers is None else list(expert_layers)
        with torch.inference_mode(False):
            memory = torch.empty((len(self.expert_layers), slots_per_layer, layout.nbytes), dtype=torch.uint8, device=device)
        self._memory: list[torch.Tensor | None] = [None] * num_layers  # [K, nbytes] per layer with experts
        for row, layer in enumerate(self.expert_layers):
            self._memory[layer] = memory[row]
        self._views = [[layout.views(rows[s]) for s in range(slots_per_layer)] if rows is not None else []
                       for rows in self._memory]
        self._layers = [_LayerSlots(slots_per_layer if self._memory[l] is not None else 0, self.cuda) for l in range(num_layers)]
        self._protected: set[int] = set()  # experts the current layer still needs
        self._current_layer = -1
        self.version = 0  # moves whenever a slot changes hands: whoever captured slot_map() checks it
        self.counters = counters if counters is not None else ExpertCounters(num_layers)

    # --- the MoE block's side (ExpertProvider) ---------------------------------------------

    def begin_layer(self, layer: int, needed: list[int]) -> list[int]:
        state = self._layers[layer]
        self._current_layer, self._protected = layer, set(needed)
        resident = [e for e in needed if e in state.slot_of]
        missing = [e for e in needed if e not in state.slot_of]
        for expert in resident:
            slot = state.slots[state.slot_of[expert]]
            self.counters.hits[layer] += 1
            if slot.prefetched_unused:
                self.counters.prefetch_hits[layer] += 1
                slot.prefetched_unused = False
            state.lru.move_to_end(expert)
        started = []
        for expert in missing:
            self.counters.misses[layer] += 1
            self._start_load(layer, expert, wait_for_victim=False)
            if expert in state.slot_of:
                started.append(expert)
        # Loaded experts first, then loading ones, then those still waiting for a slot: their
        # compute overlaps the loads, and each `done` frees a slot for the ones behind.
        loaded = [e for e in resident if state.slots[state.slot_of[e]].ticket is None]
        loading = [e for e in resident if e not in loaded]
        return loaded + loading + started + [e for e in missing if e not in started]

    def get(self, layer: int, expert: int) -> ExpertWeights:
        return self._views[layer][self.acquire(layer, expert)]

    def acquire(self, layer: int, expert: int) -> int:
        """The slot that holds the expert, once its bytes are there for the compute stream
        (on CUDA the stream waits on the copy's event; the host does not)."""
        state = self._layers[layer]
        if expert not in state.slot_of:  # it could not start in begin_layer: no slot was free then
            self._start_load(layer, expert, wait_for_victim=True)
        index = state.slot_of[expert]
        slot = state.slots[index]
        if slot.ticket is not None:
            self._wait(layer, index)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        return index

    def layer_memory(self, layer: int) -> torch.Tensor:
        """The layer's slots as one [K, nbytes] tensor (fixed address: CUDA graphs can index it)."""
        return self._memory[layer]

    def slot_weights(self, layer: int, index: int) -> ExpertWeights:
        """Views over one slot's memory (fixed addresses: CUDA graphs can read them)."""
        return self._views[layer][index]

    def slot_map(self, num_experts: int) -> dict[int, list[int]] | None:
        """When every one of the `num_experts` experts of every layer with experts sits loaded in
        a slot (nothing in flight): layer -> the slot of each expert, by expert index. Else None.
        Valid until `version` moves."""
        slots: dict[int, list[int]] = {}
        for layer in self.expert_layers:
            state = self._layers[layer]
            if sorted(state.slot_of) != list(range(num_experts)) or any(s.ticket is not None for s in state.slots):
                return None
            slots[layer] = [state.slot_of[expert] for expert in range(num_experts)]
        return slots

    def count_hits(self, layer: int, hits: int) -> None:
        """Uses of one layer's resident experts the MoE block served without begin_layer (its
        grouped prompt step)."""
        self.counters.hits[layer] += hits

    def count_resident_uses(self, uses_per_layer: int) -> None:
        """Uses the decoder served from slot_map() without asking: every one is a hit."""
        for layer in self.expert_layers:
            self.counters.hits[layer] += uses_per_layer

    def done(self, layer: int, expert: int) -> None:
        self._protected.discard(expert)
        state = self._layers[layer]
        index = state.slot_of[expert]
        if self.cuda:
            state.slots[index].free.record(torch.cuda.current_stream(self.device))
        if self.forget_after_use:
            self._evict(layer, index)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        state = self._layers[layer]
        keep = set(experts)
        for expert in experts:
            if expert in state.slot_of:
                state.lru.move_to_end(expert)
                continue
            index = self._victim(layer, keep, wait=False)
            if index is None:
                return
            self._fill(layer, index, expert, prefetch=True)

    def copy_into_free_slots(self, layer: int, experts: list[int]) -> None:
        """Start copying `experts` into the layer's empty slots, never evicting one, for later
        uses (placement auto runs them elsewhere now)."""
        state = self._layers[layer]
        for expert in experts:
            if expert in state.slot_of:
                continue
            index = next((i for i, slot in enumerate(state.slots) if slot.expert is None), None)
            if index is None:
                return
            self._fill(layer, index, expert, prefetch=False)

    # --- inside --------------------------------------------------------------------------

    def _start_load(self, layer: int, expert: int, *, wait_for_victim: bool) -> None:
        protected = self._protected if layer == self._current_layer else set()
        index = self._victim(layer, protected | {expert}, wait=wait_for_victim)
        if index is not None:
            self._fill(layer, index, expert, prefetch=False)
        elif wait_for_victim:
            raise ConfigError(
                f"--cache-experts {self.slots_per_layer}: no slot of layer {layer} is free for expert {expert}"
            )

    def _victim(self, layer: int, keep: set[int], *, wait: bool) -> int | None:
        """A slot to (re)fill: an empty one, else the least recently used expert not in `keep`
        and not loading; with `wait`, a loading one is waited for when nothing else is left."""
        state = self._layers[layer]
        for index, slot in enumerate(state.slots):
            if slot.expert is None:
                return index
        loading = None
        for expert in state.lru:
            if expert in keep:
                continue
            index = state.slot_of[expert]
            if state.slots[index].ticket is None or state.slots[index].ticket.done():
                return self._evict(layer, index)
            loading = index if loading is None else loading
        if wait and loading is not None:
            self._wait(layer, loading, quiet=True)
            return self._evict(layer, loading) if state.slots[loading].expert is not None else loading
        return None

    def _evict(self, layer: int, index: int) -> int:
        state = self._layers[layer]
        slot = state.slots[index]
        if slot.ticket is not None:
            self._wait(layer, index, quiet=True)
        self.version += 1
        if slot.expert is not None:
            if slot.prefetched_unused:
                self.counters.prefetch_wasted[layer] += 1
            del state.slot_of[slot.expert]
            del state.lru[slot.expert]
        slot.expert, slot.prefetched_unused = None, False
        return index

    def _fill(self, layer: int, index: int, expert: int, *, prefetch: bool) -> None:
        state = self._layers[layer]
        slot = state.slots[index]
        self.version += 1
        slot.expert, slot.prefetched_unused, slot.loading_for_prefetch = expert, prefetch, prefetch
        state.slot_of[expert] = index
        state.lru[expert] = None
        slot.ticket = self.loader.load(ExpertId(layer, expert), self._memory[layer][index], slot.free, slot.ready)
        self.counters.bytes_fetched[layer] += self.layout.nbytes
        if prefetch:
            self.counters.prefetch_issued[layer] += 1

    def _wait(self, layer: int, index: int, *, quiet: bool = False) -> None:
        """Wait for the load into a slot. A failed load empties the slot; unless `quiet`, the
        error is raised (a failed prefetch is retried once as a demand load first)."""
        state = self._layers[layer]
        slot = state.slots[index]
        started = time.perf_counter()
        try:
            slot.ticket.result(timeout=self.load_timeout_s)
            slot.ticket, slot.loading_for_prefetch = None, False
        except concurrent.futures.TimeoutError:
            error: Exception = HostError(f"{ExpertId(layer, slot.expert)}: not loaded after {self.load_timeout_s:.0f} s")
        except Exception as err:  # the source's own error, naming the file or host
            error = err
        else:
            return
        finally:
            self.counters.wait_s += time.perf_counter() - started
        expert, was_prefetch = slot.expert, slot.loading_for_prefetch
        slot.ticket = None
        self.version += 1
        if expert is not None:
            del state.slot_of[expert]
            del state.lru[expert]
        slot.expert, slot.prefetched_unused = None, False
        if quiet:
            return
        if was_prefetch:
            self._fill(layer, index, expert, prefetch=False)
            self._wait(layer, index)
            return
        raise error

    def load_all(self) -> None:
        """Fill every slot in order and wait (to start from a warm cache, e.g. all resident)."""
        for layer, state in enumerate(self._layers):
            self.prefetch(layer, list(range(len(state.slots))))
        for layer, state in enumerate(self._layers):
            for index, slot in enumerate(state.slots):
                if slot.ticket is not None:
                    self._wait(layer, index)
                slot.prefetched_unused = False
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def drop_failed_loads(self) -> None:
        """Empty the slots whose load failed and was never waited for (their generation ended on
        an error first), so that a later generation loads those experts afresh instead of
        raising the old error."""
        for layer, state in enumerate(self._layers):
            for index, slot in enumerate(state.slots):
                if slot.ticket is not None and slot.ticket.done() and slot.ticket.exception() is not None:
                    self._wait(layer, index, quiet=True)

    def landed(self, layer: int, experts: list[int]) -> bool:
        """Whether each of `experts` is in its slot of the layer now, its load and copy done (no
        sync: the copy's event is queried): a layer whose experts all landed waits on no copy,
        which is how placement auto times the decode's pace without the copies' waits."""
        state = self._layers[layer]
        for expert in experts:
            index = state.slot_of.get(expert)
            if index is None:
                return False
            slot = state.slots[index]
            if (slot.ticket is not None and not slot.ticket.done()) or (slot.ready is not None and not slot.ready.query()):
                return False
        return True

    def resident(self, layer: int) -> list[int]:
        """Experts of a layer that are resident or loading (for tests and the live view)."""
        return list(self._layers[layer].lru)
