"""Placement per miss: for each expert a decode step needs that is not on the device, copy it
into the cache, or run it where it lives: on this machine's CPU (LocalCpuRunner: the CPU expert
executor, common/cpu_executor.py, over the RAM or disk source's blobs, computed by the decode's
own thread once it has issued the device's experts), or on the expert host that holds it
(HostRunner: one RunExperts request per layer and host, sent from the decode's thread on a
blocking stream per host, else on the fetch loop's long-lived RunExpertsStream, or unary calls
with --run-experts unary). Both are `ExpertRunner`s.

    copy  every miss is copied into the cache (the behaviour without placement)
    run   every miss runs where it lives; the cache holds what is already resident or loading
    auto  each miss goes to whichever finishes first by the costs measured while running: the
          copy, at the link speed measured at start (for an expert host, its fetch over the
          network and then the device copy), behind the loads already queued (prefetches
          included: the loader's backlog) and those this layer adds, and one copy more where the
          layer also prefetches for later ones (they start behind its copies); or the run, at the
          executor's measured time per expert, behind the runs already given to it (the GPU
          meanwhile computes the hits). The lookahead's guesses are weighed the same way before
          they become prefetches: a guess whose copy, behind everything queued, would land later
          than its layer starts by more than a run takes is left to run where it lives if that
          layer does want it (and costs nothing if it does not). When the layer starts is
          planned at the balanced pace (`pace()`: where the link and the runner keep up with
          each other), not the measured one, which holds the copies' waits: weighed by it, the
          link stayed the bound. So the copy link is kept busy and never ahead of the decode by
          more than what a run costs, and the runner takes what the link cannot bring in time,
          rather than the token waiting on copies as it does under `copy` once the link is the
          bound. A miss run on this machine's CPU while the copy link is
          idle is also copied into an empty slot, if the layer has one, for its later uses: a
          cache that starts empty fills without a token waiting on a copy. Not for expert hosts:
          there the copy crosses the network the runs use and costs the host the CPU that runs
          them. Measured on an H200 through a shaped link (one host, every expert, K = 4, 48
          tokens from an empty cache): one background copy at a time, with the runs on a TCP
          connection of their own, still decoded 3.37 tok/s at 1 GbE and 3.99 at 10 GbE against
          4.21 and 4.64 running only (unthrottled, on one connection: 0.44 against 3.55)

Prompts (several tokens per expert) always copy: a copy serves every token, a run costs per
token. Prefetch keeps working for copies. Knows nothing of the model's math: it only splits a
layer's needed experts between the cache and a runner.

Dimension legend: T = tokens, H = hidden size, n = experts run elsewhere."""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from itertools import groupby
from typing import Protocol

import torch
from tqdm import tqdm

from common.cpu_executor import CpuExpert, run_experts
from common.errors import ConfigError
from common.expert_id import ExpertId
from common.store.blob_layout import BlobLayout

from .counters import ExpertCounters
from .engine_options import PLACEMENTS
from .moe import CacheDispatcher
from .routing_plan import LayerWork, RoutingPlan

# "1": the CPU runner's experts run on a worker thread of their own, as before inline runs (to
# compare the two in one bench: the hand-off to it and back measured ~0.25 ms a run)
CPU_RUN_THREAD_SWITCH = "MOE_EDGE_CPU_RUN_THREAD"

# "1": RunExperts calls go through the fetch loop (ExpertPool.run_layer), as before the blocking
# streams; to compare the two in one bench
HOST_RUNS_ON_LOOP_SWITCH = "MOE_EDGE_HOST_RUNS_ON_LOOP"

# How auto weighs the lookahead's guesses: "1" (the default) against the balanced pace, "measured"
# against the decode's measured pace, "0" not at all (every guess prefetched, as copy does)
WEIGH_GUESSES_SWITCH = "MOE_EDGE_WEIGH_GUESSES"
WEIGHINGS = {"1": "balanced", "measured": "measured", "0": None}


class PendingRun(Protocol):
    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The run's weighted sum [T, H] float32, waited for (or computed) now."""


class ExpertRunner(Protocol):
    def start(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor) -> PendingRun:
        """Run `experts` of `layer` on hidden [T, H] (host memory) and sum their outputs with
        weights [T, n] float32: something whose result() is [T, H] float32 in host memory."""

    def seconds_per_expert(self) -> float:
        """Measured time to run one expert (an estimate before the first run)."""

    def warm(self, experts: list[ExpertId], *, progress: bool = False) -> None:
        """Make `experts` ready to run (repacked for the CPU where they live), so that no later
        run pays that one-time cost: what bench does before it times anything."""

    copies_cross_its_link: bool
    """Whether a copy of an expert this runner could run travels the same link as the runs
    (an expert host's network): then auto copies nothing in the background."""


class InlineRun:
    """A run that the thread asking for its result computes itself, then: the token loop asks
    only once it has issued the device's experts, so the CPU computes while the GPU does, with no
    hand-off to a worker thread and back (~0.25 ms a run on the sandbox and on the H200's VM,
    against ~1 ms of kernel)."""

    __slots__ = ("_run", "_args")

    def __init__(self, run, *args) -> None:
        self._run, self._args = run, args

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self._run(*self._args)


class LocalCpuRunner:
    """Runs experts on this machine's CPU from a local source's blobs (the RAM source's pinned
    arena, or the store's files), on the thread that waits for them (InlineRun; a worker thread
    of its own with MOE_EDGE_CPU_RUN_THREAD=1). Each expert is repacked for the CPU on its first
    run and kept: about 0.31 bytes per weight for 2-bit experts on the native kernel, 0.56 at 3 or
    4 bits (or on int4pack), on top of the source's own copy."""

    copies_cross_its_link = False  # copies take PCIe, runs this CPU's memory

    def __init__(self, source, layout: BlobLayout, dtype: torch.dtype, hidden_size: int) -> None:
        self.source, self.layout, self.dtype, self.hidden_size = source, layout, dtype, hidden_size
        self._experts: dict[ExpertId, CpuExpert] = {}
        on_thread = os.environ.get(CPU_RUN_THREAD_SWITCH, "0")
        if on_thread not in ("0", "1"):
            raise ConfigError(f"{CPU_RUN_THREAD_SWITCH}={on_thread}: choose 0 (runs on the waiting thread) or 1 (a worker thread)")
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moe-edge-cpu-experts")
                      if on_thread == "1" else None)
        self._seconds: float | None = None  # running mean time of one expert
        self.compute_seconds = 0.0  # every run's time on the CPU (the stats' "cpu ms")

    def start(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor) -> PendingRun:
        if self._pool is not None:
            return self._pool.submit(self._run, layer, experts, hidden, weights)
        return InlineRun(self._run, layer, experts, hidden, weights)

    def _run(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ready = [self._expert(ExpertId(layer, e)) for e in experts]
        started = time.perf_counter()
        out = run_experts(hidden, ready, weights)  # [T, H] float32
        spent = time.perf_counter() - started
        self.compute_seconds += spent
        each = spent / len(experts)
        self._seconds = running_mean(self._seconds, each, 0.2)
        return out

    def _expert(self, eid: ExpertId) -> CpuExpert:
        expert = self._experts.get(eid)
        if expert is None:  # from where the source holds it: RAM's arena, or read from disk once
            expert = self._experts[eid] = self._repack(eid)
        return expert

    def _repack(self, eid: ExpertId) -> CpuExpert:
        return CpuExpert(self.layout.views(self.source.blob(eid)), dtype=self.dtype)

    def warm(self, experts: list[ExpertId], *, progress: bool = False) -> None:
        """Repack every expert of `experts` not yet ready, a few at a time (torch's repacking
        releases the GIL), on this thread while no run is in flight."""
        missing = [eid for eid in experts if eid not in self._experts]
        workers = max(1, min(4, (os.cpu_count() or 1) // 2))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="moe-edge-repack") as pool:
            repacked = pool.map(self._repack, missing)
            for eid, expert in tqdm(zip(missing, repacked), total=len(missing), desc="repacking experts for the CPU",
                                    unit="expert", disable=not progress):
                self._experts[eid] = expert

    def measure(self, eid: ExpertId, repeats: int = 3) -> float:
        """The best time of `repeats` runs of `eid` on one zero token (repacked first, and kept):
        what auto weighs runs by until the decode's own runs update it."""
        expert, x = self._expert(eid), torch.zeros(1, self.hidden_size, dtype=self.dtype)
        expert(x)  # first touch of its repacked pages
        self._seconds = best_seconds(lambda: expert(x), repeats)
        return self._seconds

    def seconds_per_expert(self) -> float:
        # before a measure or a run: about a memory read of the blob at a few GB/s, so copies are tried first
        return self._seconds if self._seconds is not None else self.layout.nbytes / 5e9

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class HostRunner:
    """Runs experts on the expert hosts that hold them, one RunExperts request per layer and host:
    sent from the calling thread on each host's blocking stream, the replies read by the thread
    that asks for the result (ExpertPool.start_run_here / finish_run_here: no hand-off to the
    fetch loop and back), or, where that cannot take the layer or with MOE_EDGE_HOST_RUNS_ON_LOOP=1,
    ExpertPool.run_layer on the fetch loop. A host that fails hands its experts to a replica."""

    copies_cross_its_link = True  # a copy is a fetch over the same network as the runs

    def __init__(self, pool, fetch_loop, *, hidden_size: int, dtype: torch.dtype) -> None:
        self.pool, self.fetch_loop = pool, fetch_loop
        self.hidden_size, self.dtype = hidden_size, dtype  # what warm sends, as the decode steps will
        self._seconds: float | None = None  # running mean time of one expert, the round trip included
        on_loop = os.environ.get(HOST_RUNS_ON_LOOP_SWITCH, "0")
        if on_loop not in ("0", "1"):
            raise ConfigError(f"{HOST_RUNS_ON_LOOP_SWITCH}={on_loop}: choose 0 (from the waiting thread) or 1 (the fetch loop)")
        self.here = on_loop == "0" and callable(getattr(pool, "start_run_here", None))

    def start(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor) -> PendingRun:
        started = time.perf_counter()
        runs = self.pool.start_run_here(layer, experts, hidden, weights) if self.here else None
        if runs is not None:
            return InlineRun(self._finish_here, runs, started, len(experts))
        future = self.fetch_loop.submit(self.pool.run_layer(layer, experts, hidden, weights))

        def measured(done: concurrent.futures.Future) -> None:
            if done.exception() is None:
                self._measured(started, len(experts))

        future.add_done_callback(measured)
        return future

    def _finish_here(self, runs, started: float, count: int) -> torch.Tensor:
        out = self.pool.finish_run_here(runs)
        self._measured(started, count)
        return out

    def _measured(self, started: float, count: int) -> None:
        """A call of `count` experts that began at `started` has answered: the running mean per expert."""
        self._seconds = running_mean(self._seconds, (time.perf_counter() - started) / count, 0.2)

    def seconds_per_expert(self) -> float:
        if self._seconds is not None:
            return self._seconds
        reported = self.pool.expert_seconds()  # the hosts' own measurement, before a first call
        return reported if reported is not None else 0.01

    def fetch_seconds(self, eid: ExpertId, nbytes: int, repeats: int = 2) -> float:
        """The best time of `repeats` fetches of one expert from its host into host memory: what
        a copy costs before it reaches the device link (the pool counts these bytes as fetched)."""
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        return best_seconds(lambda: self.fetch_loop.submit(self.pool.fetch_into(eid, buffer)).result(), repeats)

    def warm(self, experts: list[ExpertId], *, progress: bool = False, timeout_s: float = 600.0) -> None:
        """Run every expert of `experts` once on one zero token, one RunExperts call per layer
        (and host): each host repacks what it had not run yet in this dtype, and keeps it."""
        layers = [(layer, [eid.expert for eid in group]) for layer, group in groupby(sorted(experts), key=lambda e: e.layer)]
        for layer, indices in tqdm(layers, desc="preparing the hosts' experts", unit="layer", disable=not progress):
            hidden = torch.zeros(1, self.hidden_size, dtype=self.dtype)  # [1, H]
            weights = torch.zeros(1, len(indices))  # [1, n]
            self.fetch_loop.submit(self.pool.run_layer(layer, indices, hidden, weights, timeout_s=timeout_s)).result()

    def close(self) -> None:
        pass


class PlacementDispatcher:
    """A LayerDispatcher (routing_plan.py) that decides, per miss, copy or run."""

    def __init__(self, cache, inner: CacheDispatcher, runner: ExpertRunner, *, placement: str,
                 copy_seconds_per_expert: float, counters: ExpertCounters, weigh_guesses: str | None = "") -> None:
        """`weigh_guesses`: how auto leaves to the runner the guesses the link cannot bring in
        time (module docstring): "balanced", "measured" or None (every guess is prefetched);
        "" reads MOE_EDGE_WEIGH_GUESSES (WEIGHINGS)."""
        if placement not in PLACEMENTS:
            raise ConfigError(f"--placement {placement}: choose {', '.join(PLACEMENTS)}")
        self.cache, self.inner, self.runner = cache, inner, runner
        self.placement = placement
        self.copy_seconds = copy_seconds_per_expert
        self.counters = counters
        if weigh_guesses == "":
            switch = os.environ.get(WEIGH_GUESSES_SWITCH, "1")
            if switch not in WEIGHINGS:
                raise ConfigError(f"{WEIGH_GUESSES_SWITCH}={switch}: choose {', '.join(WEIGHINGS)}")
            weigh_guesses = WEIGHINGS[switch]
        self.weigh_guesses = weigh_guesses
        self.layer_seconds: float | None = None  # the decode's measured pace: seconds from one layer's plan to the next's
        self.clear_layer_seconds: float | None = None  # the same, from layers that waited on no copy and no run
        self.loads_per_layer: float | None = None  # copies and runs a layer's plan starts (prefetches included)
        self._last_plan: tuple[int, float, bool] | None = None  # (layer, time, waits on nothing) of the last plan

    def dispatch(self, plan: RoutingPlan) -> LayerWork:
        if plan.tokens > 1 or self.placement == "copy":
            return self.inner.dispatch(plan)
        now = time.perf_counter()
        self._time_layer(plan.layer, now)
        held = set(self.cache.resident(plan.layer))  # resident or loading: computed on the device
        misses = [e for e in plan.needed if e not in held]
        guesses, prefetches = plan.guesses, 0
        if self.placement == "run":
            elsewhere = misses
        else:
            backlog = len(self.cache.loader.backlog)
            held_later = {later: set(self.cache.resident(later)) for later in plan.guesses}
            later_copies = any(set(experts) - held_later[later] for later, experts in plan.guesses.items())
            elsewhere = self._cheaper_to_run(misses, backlog, later_copies)
            if elsewhere and backlog == 0 and not self.runner.copies_cross_its_link:  # the link is idle
                self.cache.copy_into_free_slots(plan.layer, elsewhere)  # empty slots filled for later uses
            if self.weigh_guesses:
                guesses, prefetches = self._guesses_in_time(plan, held_later,
                                                            queued=backlog + len(misses) - len(elsewhere))
        on_device_plan = RoutingPlan(plan.layer, plan.tokens, [e for e in plan.chosen if e not in elsewhere], guesses)
        work = self.inner.dispatch(on_device_plan)
        self.counters.runs_elsewhere[plan.layer] += len(elsewhere)
        loads = len(misses) + prefetches  # what this plan gives the link or the runner
        self.loads_per_layer = running_mean(self.loads_per_layer, loads, 0.1)
        waits_on_nothing = not misses and self.cache.landed(plan.layer, plan.needed)  # none ran elsewhere either
        self._last_plan = (plan.layer, now, waits_on_nothing)
        return LayerWork(work.on_device, elsewhere)

    def _time_layer(self, layer: int, now: float) -> None:
        """Update layer_seconds from the time since the previous layer's plan (within one token:
        a lower layer means the token ended, and sampling and the head are not a layer's pace),
        and clear_layer_seconds where that layer waited on nothing."""
        if self._last_plan is None or layer <= self._last_plan[0]:
            return
        last_layer, last_time, waited_on_nothing = self._last_plan
        each = (now - last_time) / (layer - last_layer)
        self.layer_seconds = running_mean(self.layer_seconds, each, 0.1)
        if waited_on_nothing and layer == last_layer + 1:
            self.clear_layer_seconds = running_mean(self.clear_layer_seconds, each, 0.1)

    def pace(self) -> float | None:
        """Seconds per layer that the guesses are weighed against. "measured": the decode's own
        pace. "balanced": the pace at which the link and the runner share a layer's n loads
        (copies and runs) so that each keeps up with the other. A layer that waits on nothing
        takes g; runs of r each add to it, copies of c each overlap it. Copying n - m of them
        while running m takes p = g + m r of decode and (n - m) c of link: they meet at
            p = (g + n r) / (1 + r / c),
        shorter than the measured pace whenever the link is what the decode waits on (the
        measured pace then holds the copies' waits, and weighed by it the link stays the bound).
        It is never planned longer than measured."""
        if self.weigh_guesses != "balanced" or self.clear_layer_seconds is None or self.loads_per_layer is None:
            return self.layer_seconds
        run_each = self.runner.seconds_per_expert()
        balanced = (self.clear_layer_seconds + self.loads_per_layer * run_each) / (1 + run_each / self.copy_seconds)
        return balanced if self.layer_seconds is None else min(balanced, self.layer_seconds)

    def _guesses_in_time(self, plan: RoutingPlan, held_later: dict[int, set[int]],
                         queued: int) -> tuple[dict[int, list[int]], int]:
        """The guesses worth prefetching, behind `queued` copies, and how many copies they add:
        each guess not yet held (`held_later`: per later layer) is kept if its copy would land no
        later than its layer's start plus a run's time, at pace(); the others are left to the
        runner (counted as prefetch_left). Before a pace is known (the first token), every one."""
        pace = self.pace()
        run_each, kept, added = self.runner.seconds_per_expert(), {}, 0
        for later, experts in plan.guesses.items():
            held = held_later[later]
            lead = math.inf if pace is None else (later - plan.layer) * pace  # until that layer's plan
            kept[later] = []
            for expert in experts:
                if expert not in held and (queued + added + 1) * self.copy_seconds > lead + run_each:
                    self.counters.prefetch_left[later] += 1
                    continue
                added += expert not in held
                kept[later].append(expert)
        return kept, added

    def _cheaper_to_run(self, misses: list[int], backlog: int, later_copies: bool = False) -> list[int]:
        """Greedy: each miss to whichever queue (copies, behind `backlog` loads already queued;
        runs) would finish it first, a copy charged one copy more where this plan prefetches for
        later layers (`later_copies`): those start behind its copies, so each copy of a miss
        delays the next layer's by its own time, while a run delays only this layer. Measured on
        the H200 without that charge: with the link kept short of the decode, a miss met an idle
        link, its copy (1.04 ms) beat a run (1.2 ms) and the decode waited on it, 10-14 a token."""
        copy_busy, run_busy, run_each = backlog * self.copy_seconds, 0.0, self.runner.seconds_per_expert()
        delay = self.copy_seconds if later_copies else 0.0
        elsewhere = []
        for expert in misses:
            if run_busy + run_each < copy_busy + self.copy_seconds + delay:
                run_busy += run_each
                elsewhere.append(expert)
            else:
                copy_busy += self.copy_seconds
        return elsewhere


def running_mean(mean: float | None, sample: float, weight: float) -> float:
    """An exponential running mean that gives `sample` `weight` (the first sample is the mean)."""
    return sample if mean is None else (1 - weight) * mean + weight * sample


def measure_copy_seconds(device: torch.device, nbytes: int) -> float:
    """Time to copy one blob of `nbytes` into the device from pinned (or plain) host memory."""
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy() -> None:
        target.copy_(host, non_blocking=pinned)
        if pinned:
            torch.cuda.synchronize(device)

    return best_seconds(copy, 3)


def best_seconds(work, repeats: int) -> float:
    """The shortest wall time of `repeats` calls of work(): what one costs without the noise."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best
