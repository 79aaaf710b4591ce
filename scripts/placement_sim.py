"""A model of the decode's timeline, to weigh placement auto's rules without a GPU: the real
PlacementDispatcher (coordinator/runtime/placement.py) and CacheDispatcher decide, on a clock of
this script's, against a cache of K LRU slots per layer, one copy link that finishes copies in
issue order, and a CPU that runs a layer's experts one after another. Not a benchmark: its
costs are inputs (the defaults are what the H200 machine measured, 2026-12-02: a 2-bit
Mixtral-8x7B expert copied in 1.04 ms, run on its CPU in 1.2 ms in the decode), and what it
says holds only as far as those costs and this timeline do. Use it to choose what the next GPU
session measures.

    python -m scripts.placement_sim [--tokens 64] [--copy-ms 1.04] [--run-ms 1.2] [--layer-ms 0.25]

Per layer: the plan is read at t; runs start at t on the CPU; the device computes its experts in
the dispatcher's order, each once its copy has landed (gpu-ms each); the layer ends when both
are done, and the next plan is read layer-ms later (attention, routing, the read-back). Routing
is uniform random, top 2 of 8 experts (as the synthetic store's routers are close to); the
lookahead guesses the next layer's two experts, each wrong with probability --wrong."""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict, deque
from types import SimpleNamespace
from unittest import mock

from coordinator.runtime import placement
from coordinator.runtime.counters import ExpertCounters
from coordinator.runtime.moe import CacheDispatcher
from coordinator.runtime.routing_plan import RoutingPlan


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Link:
    """Copies finish in issue order, `seconds` each."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock, self.seconds, self.free_at, self.finishing = clock, seconds, 0.0, deque()

    def issue(self) -> float:
        self.free_at = max(self.clock.now, self.free_at) + self.seconds
        self.finishing.append(self.free_at)
        return self.free_at

    def __len__(self) -> int:  # the loads issued and not done: the loader's backlog
        while self.finishing and self.finishing[0] <= self.clock.now:
            self.finishing.popleft()
        return len(self.finishing)


class Cache:
    """K slots per layer, LRU; what PlacementDispatcher and CacheDispatcher call of ExpertCache."""

    def __init__(self, clock: Clock, link: Link, layers: int, slots: int) -> None:
        self.clock, self.link, self.slots = clock, link, slots
        self.ready = [OrderedDict() for _ in range(layers)]  # expert -> when its copy lands, LRU first
        self.loader = SimpleNamespace(backlog=link)
        self.copies = 0

    def resident(self, layer: int) -> list[int]:
        return list(self.ready[layer])

    def landed(self, layer: int, experts: list[int]) -> bool:
        held = self.ready[layer]
        return all(e in held and held[e] <= self.clock.now for e in experts)

    def _fill(self, layer: int, expert: int, keep: set[int], *, wait: bool) -> bool:
        held = self.ready[layer]
        if len(held) >= self.slots:
            victims = [e for e, at in held.items() if e not in keep and (wait or at <= self.clock.now)]
            if not victims:
                return False
            del held[victims[0]]
        held[expert] = self.link.issue()
        self.copies += 1
        return True

    def begin_layer(self, layer: int, needed: list[int]) -> list[int]:
        for expert in needed:
            if expert in self.ready[layer]:
                self.ready[layer].move_to_end(expert)
            else:
                self._fill(layer, expert, set(needed), wait=True)
        return sorted(needed, key=lambda e: self.ready[layer][e])  # landed first, as begin_layer orders them

    def prefetch(self, layer: int, experts: list[int]) -> None:
        for expert in experts:
            if expert in self.ready[layer]:
                self.ready[layer].move_to_end(expert)
            elif not self._fill(layer, expert, set(experts), wait=False):
                return

    def copy_into_free_slots(self, layer: int, experts: list[int]) -> None:
        for expert in experts:
            if expert not in self.ready[layer] and len(self.ready[layer]) < self.slots:
                self._fill(layer, expert, set(), wait=False)


def simulate(placement_name: str, weigh: str | None, charge: bool, args, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    clock = Clock()
    link = Link(clock, args.copy_ms / 1e3)
    cache = Cache(clock, link, args.layers, args.slots)
    runner = SimpleNamespace(copies_cross_its_link=False, seconds_per_expert=lambda: args.run_ms / 1e3)
    counters = ExpertCounters(args.layers)
    inner = CacheDispatcher(cache, None)
    with mock.patch.object(placement, "time", clock):
        dispatcher = placement.PlacementDispatcher(cache, inner, runner, placement=placement_name,
                                                   copy_seconds_per_expert=args.copy_ms / 1e3, counters=counters,
                                                   weigh_guesses=weigh)
        if not charge:
            cheaper = dispatcher._cheaper_to_run
            dispatcher._cheaper_to_run = lambda misses, backlog, later=False: cheaper(misses, backlog, False)
        runs, started = 0, None
        for token in range(args.tokens + args.warmup):
            if token == args.warmup:
                started, copies_before, runs = clock.now, cache.copies, 0
            chosen = [rng.sample(range(args.experts), 2) for _ in range(args.layers)]
            for layer in range(args.layers):
                guesses = {}
                if layer + 1 < args.layers:
                    wrong = [e for e in range(args.experts) if e not in chosen[layer + 1]]
                    guesses = {layer + 1: [e if rng.random() >= args.wrong else rng.choice(wrong) for e in chosen[layer + 1]]}
                plan = RoutingPlan(layer, 1, chosen[layer], guesses)
                work = dispatcher.dispatch(plan) if placement_name != "copy" else inner.dispatch(plan)
                runs += len(work.elsewhere)
                run_done = clock.now + len(work.elsewhere) * args.run_ms / 1e3
                device = clock.now
                for expert in work.on_device:
                    device = max(device, cache.ready[layer][expert]) + args.gpu_ms / 1e3
                clock.now = max(device, run_done) + args.layer_ms / 1e3
            clock.now += args.head_ms / 1e3
    seconds = clock.now - started
    return dict(tok_s=args.tokens / seconds, copies=(cache.copies - copies_before) / args.tokens, runs=runs / args.tokens,
                link_busy=(cache.copies - copies_before) * args.copy_ms / 1e3 / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--copy-ms", type=float, default=1.04)
    parser.add_argument("--run-ms", type=float, default=1.2)
    parser.add_argument("--gpu-ms", type=float, default=0.05, help="the device's time per expert")
    parser.add_argument("--layer-ms", type=float, default=0.25, help="attention, routing and the read-back per layer")
    parser.add_argument("--head-ms", type=float, default=0.5)
    parser.add_argument("--wrong", type=float, default=0.05, help="chance that a guess is wrong")
    args = parser.parse_args()
    rows = [("copy", "copy", None, False), ("auto, guesses not weighed", "auto", None, False),
            ("auto, measured pace", "auto", "measured", False), ("auto, balanced pace", "auto", "balanced", False),
            ("auto, measured pace, copies charged", "auto", "measured", True),
            ("auto, balanced pace, copies charged", "auto", "balanced", True), ("run", "run", None, False)]
    print(f"copy {args.copy_ms} ms, run {args.run_ms} ms, device {args.gpu_ms} ms an expert, {args.layer_ms} ms a layer "
          f"besides, K = {args.slots} of {args.experts}, {args.layers} layers, {args.tokens} tokens (a model, not a benchmark)")
    print(f"{'rule':38s} {'tok/s':>7s} {'copies':>7s} {'runs':>6s} {'link busy':>9s}")
    for label, name, weigh, charge in rows:
        seeds = [simulate(name, weigh, charge, args, seed) for seed in range(3)]
        mean = {key: sum(s[key] for s in seeds) / len(seeds) for key in seeds[0]}
        print(f"{label:38s} {mean['tok_s']:7.2f} {mean['copies']:7.1f} {mean['runs']:6.1f} {mean['link_busy']:9.0%}")


if __name__ == "__main__":
    main()
