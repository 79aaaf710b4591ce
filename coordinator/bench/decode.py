"""`bench`: decode speed of the offloading modes, side by side in one process and one report.

Modes (same store, same weights, same token stream):
  naive         no cache: every expert is copied to the device when a token needs it
  lru           K slots per layer, least recently used evicted
  lru+prefetch  the same, plus router lookahead loading the next layers' experts ahead
  resident      every expert on the device (the upper bound), where memory allows

With `placements` (copy, run, auto: runtime/placement.py), lru and lru+prefetch run once per
placement, on the same engine; naive and resident only copy. Experts run where they live on this
machine's CPU for a local source, on their expert host for `--hosts`; every one of them is made
ready to run (repacked) before anything is timed, once for all modes (`Engine.prepare_runs`).

Each mode first runs the prompt once untimed and starts again from a cold cache, so no mode's
timed prompt pays the one-time warm-up. Decode steps are fed a fixed, seeded random token stream
(teacher forcing), so routing varies from token to token as in real text rather than collapsing
onto a loop of one token; routing itself comes from random weights, which the report says, unless
`--routing FILE` replays a trained model's routing trace (replay_routing). The breakdown per token comes from a
separate pass that synchronizes at each phase boundary (runtime/phase_clock.py).

A client of the engine, not a second engine: one Engine is built from EngineOptions, and each
mode is `Engine.use_cache_mode` then `Engine.forced_decode`, through the same prompt and decode
paths as `generate`; the counts come from `Engine.snapshot()`."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from common.errors import ConfigError

from ..runtime.counters import EngineSnapshot
from ..runtime.engine import CACHE_MODES, Engine
from ..runtime.engine_options import PLACEMENTS, EngineOptions
from ..runtime.expert_loader import CopyTimer
from ..runtime.phase_clock import PHASES, PhaseClock
from .host_load import HostLoad, HostLoadMeter

PLACED_MODES = ("lru", "lru+prefetch")  # the modes with misses for a placement to place


def mode_placements(modes: tuple[str, ...], placements: tuple[str, ...]) -> list[tuple[str, str]]:
    """The (mode, placement) pairs to run, in order: naive and resident only with copy."""
    return [(m, p) for m in modes for p in placements if p == "copy" or m in PLACED_MODES]


@dataclass
class ModeResult:
    mode: str
    cache_experts: int
    skipped: str | None = None
    placement: str = "copy"
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    hit_rate: float = 0.0
    prefetch_recall: float | None = None  # of the uses that were not resident before, the share a prefetch brought in
    prefetch_precision: float | None = None  # of the experts prefetched, the share used before eviction
    experts_copied_per_token: float = 0.0
    bytes_copied_per_token: float = 0.0
    link_gbps: float = 0.0  # bytes copied / decode time
    copy_busy_share: float = 0.0  # time the copy stream was busy / decode time
    copy_gbps_while_busy: float = 0.0
    peak_gpu_gb: float = 0.0
    host_rss_gb: float = 0.0
    breakdown_ms_per_token: dict[str, float] = field(default_factory=dict)
    # Where each expert use ran, per token: on the device (a hit, or a miss copied in), or where it lives.
    hits_per_token: float = 0.0
    misses_per_token: float = 0.0  # copied in on demand (prefetched copies are hits)
    runs_elsewhere_per_token: float = 0.0  # on this machine's CPU or on an expert host (BenchReport.runs_elsewhere_on)
    prefetch_left_per_token: float = 0.0  # guesses placement auto left to run there: their copy would land too late
    # Bytes per token over each link: "ram" / "disk" -> device copies; an expert host's address ->
    # {"fetched": host to us, "run_sent": hidden states to it, "run_received": sums from it}.
    bytes_per_token_by_link: dict[str, dict[str, float]] = field(default_factory=dict)
    copy_wait_ms_per_token: float = 0.0  # the token loop waiting on copies into the cache
    run_wait_ms_per_token: float = 0.0  # the token loop waiting on runs elsewhere, after the device's experts
    host_run_ms_per_token: float = 0.0  # RunExperts calls in flight, summed over hosts (wire and the host's compute)
    host_compute_ms_per_token: float = 0.0  # of those, what the hosts said they spent computing

    @property
    def label(self) -> str:
        return self.mode if self.placement == "copy" else f"{self.mode}/{self.placement}"


@dataclass
class BenchReport:
    store: str
    device: str
    dtype: str
    expert_bits: int
    group_size: int
    expert_mb: float
    layers: int  # layers with experts (dense layers run on the device and are not counted)
    experts: int
    cache_experts: int
    prompt_tokens: int
    tokens: int
    pinned_peak_gbps: float
    results: list[ModeResult]
    cuda_graphs: bool = False
    host_peak_rss_gb: float = 0.0
    routing: str = "random weights (synthetic or untrained): hit rates and prefetch recall are not a trained model's"
    source: str = "ram"  # ram, disk, or the expert hosts' addresses
    runs_elsewhere_on: str = "cpu"  # where run/auto runs a miss: "cpu" (this machine's) or "host"
    prepare_runs_s: float | None = None  # repacking every expert for runs elsewhere, before timing; None: not needed
    host_load: HostLoad | None = None  # how busy other processes kept the host while the modes ran

    def result(self, mode: str, placement: str = "copy") -> ModeResult | None:
        return next((r for r in self.results if r.mode == mode and r.placement == placement and r.skipped is None), None)

    def copy_bound(self, mode: str = "lru+prefetch", placement: str = "copy") -> float | None:
        """tokens/s if the link did nothing but this mode's copies at the measured peak."""
        result = self.result(mode, placement)
        if result is None or result.bytes_copied_per_token == 0:
            return None
        return self.pinned_peak_gbps * 1e9 / result.bytes_copied_per_token

    def to_dict(self) -> dict:
        data = asdict(self)
        data["copy_bound_tokens_per_s"] = {r.label: self.copy_bound(r.mode, r.placement)
                                           for r in self.results if r.skipped is None}
        return data


def measure_pinned_peak(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best host->device GB/s of a large pinned copy, measured now on this machine."""
    if device.type != "cuda":
        source, target = torch.empty(nbytes // 4, dtype=torch.uint8), torch.empty(nbytes // 4, dtype=torch.uint8)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
        return source.numel() / best / 1e9
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            target.copy_(host, non_blocking=True)
            end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del host, target
    return nbytes / best / 1e9


def run_mode(engine: Engine, mode: str, *, prompt: list[int], stream: list[int], warmup: int, tokens: int,
             profile: int, placement: str = "copy") -> ModeResult:
    """One mode on the engine, its misses placed by `placement`: prefill, `warmup` untimed steps,
    `tokens` timed steps, then `profile` steps with the decoder's phase clock on."""
    device = engine.device
    try:
        engine.use_cache_mode(mode, placement)
    except ConfigError as err:
        return ModeResult(mode, engine.config.num_experts, skipped=str(err), placement=placement)
    # An untimed prompt first, so that whichever mode runs first pays no one-time cost (kernel
    # compiles, cuBLAS choices, first touches) inside its timed prompt; then a cold cache again.
    with engine.forced_decode(prompt, len(stream)) as run:
        run.prefill()
    engine.use_cache_mode(mode, placement)
    if device.type == "cuda":  # after the rebuild, so the previous mode's cache is not counted
        torch.cuda.reset_peak_memory_stats(device)
    result = ModeResult(mode, engine.cache.slots_per_layer, placement=placement)
    timer = engine.loader.timer = CopyTimer()
    try:
        with engine.forced_decode(prompt, len(stream)) as run:
            _sync(device)
            started = time.perf_counter()
            run.prefill()
            result.prefill_tokens_per_s = len(prompt) / (time.perf_counter() - started)
            for index in range(warmup):
                run.step(stream[index])
            _sync(device)
            before = engine.snapshot()
            timer.reset()
            started = time.perf_counter()
            for index in range(warmup, warmup + tokens):
                run.step(stream[index])
            _sync(device)
            decode_s = time.perf_counter() - started
            _fill(result, engine.snapshot().since(before), decode_s, timer.busy_seconds(), tokens)
            clock = run.decoder.clock = PhaseClock(device)
            clock.start()
            for index in range(warmup + tokens, warmup + tokens + profile):
                run.step(stream[index])
                clock.mark("other")
            run.decoder.clock = None
            result.breakdown_ms_per_token = {p: clock.seconds.get(p, 0.0) / profile * 1000 for p in PHASES}
    finally:
        engine.loader.timer = None
    if device.type == "cuda":
        result.peak_gpu_gb = torch.cuda.max_memory_allocated(device) / 1e9
    result.host_rss_gb = psutil.Process().memory_info().rss / 1e9
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fill(result: ModeResult, delta: EngineSnapshot, decode_s: float, busy_s: float, tokens: int) -> None:
    uses, copies, fetched = delta.uses, delta.experts_copied, delta.total("bytes_fetched")
    result.decode_tokens_per_s = tokens / decode_s
    result.hit_rate = delta.total("hits") / uses if uses else 0.0
    issued = delta.total("prefetch_issued")
    if issued:
        not_resident = delta.total("prefetch_hits") + delta.total("misses")
        result.prefetch_recall = delta.total("prefetch_hits") / not_resident if not_resident else 1.0
        result.prefetch_precision = delta.total("prefetch_hits") / issued
    result.experts_copied_per_token = copies / tokens
    result.bytes_copied_per_token = fetched / tokens
    result.link_gbps = fetched / decode_s / 1e9
    result.copy_busy_share = busy_s / decode_s
    result.copy_gbps_while_busy = fetched / busy_s / 1e9 if busy_s > 0 else 0.0
    result.hits_per_token = delta.total("hits") / tokens
    result.misses_per_token = delta.total("misses") / tokens
    result.runs_elsewhere_per_token = delta.total("runs_elsewhere") / tokens
    result.prefetch_left_per_token = delta.total("prefetch_left") / tokens
    result.bytes_per_token_by_link = _bytes_per_link(delta, tokens)
    result.copy_wait_ms_per_token = delta.wait_s / tokens * 1000
    result.run_wait_ms_per_token = delta.run_wait_s / tokens * 1000
    result.host_run_ms_per_token = sum(delta.run_seconds_by_source.values()) / tokens * 1000
    result.host_compute_ms_per_token = sum(delta.run_compute_seconds_by_source.values()) / tokens * 1000


def _bytes_per_link(delta: EngineSnapshot, tokens: int) -> dict[str, dict[str, float]]:
    """Per origin: what came into the cache from it, and, for an expert host, what RunExperts
    sent to it and received from it; only the links that carried something."""
    links: dict[str, dict[str, float]] = {}
    for origin in sorted(set(delta.bytes_by_source) | set(delta.run_bytes_by_source)):
        received = delta.run_bytes_received_by_source.get(origin, 0)
        link = {"fetched": delta.bytes_by_source.get(origin, 0) / tokens}
        if delta.run_bytes_by_source.get(origin):
            link["run_sent"] = (delta.run_bytes_by_source[origin] - received) / tokens
            link["run_received"] = received / tokens
        if any(link.values()):
            links[origin] = link
    return links


def run_bench(*, store: str | Path, options: EngineOptions, tokens: int = 32, prompt_tokens: int = 16,
              warmup_tokens: int = 4, profile_tokens: int = 8, modes: tuple[str, ...] = CACHE_MODES,
              placements: tuple[str, ...] | None = None, seed: int = 0,
              open_engine: Callable[[], Engine] | None = None, routing: str | Path | None = None) -> BenchReport:
    """Every (mode, placement) pair of `modes` x `placements` (default: the options' placement)
    on one Engine built from `options` (K, depth, device, dtype...), or opened by `open_engine`
    (the CLI's way, for expert hosts). `routing`: a routing trace file to replay instead of the
    store's routers (replay_routing)."""
    unknown = [m for m in modes if m not in CACHE_MODES]
    if unknown:
        raise ConfigError(f"--modes {','.join(unknown)}: choose from {', '.join(CACHE_MODES)}")
    placements = placements or (options.placement,)
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise ConfigError(f"--placements {','.join(unknown)}: choose from {', '.join(PLACEMENTS)}")
    pairs = mode_placements(modes, placements)
    if not pairs:
        raise ConfigError(f"--modes {','.join(modes)} with --placements {','.join(placements)}: nothing to run "
                          f"(naive and resident only copy; run and auto place the misses of {' and '.join(PLACED_MODES)})")
    if tokens < 1 or prompt_tokens < 1 or warmup_tokens < 0 or profile_tokens < 1:
        raise ConfigError("--tokens, --prompt-tokens and --profile-tokens must be at least 1, --warmup-tokens at least 0")
    with (open_engine() if open_engine is not None else Engine.from_options(store, options)) as engine:
        c = engine.config
        total = warmup_tokens + tokens + profile_tokens
        replayed = replay_routing(engine, routing, decode_steps=total) if routing is not None else None
        if replayed is not None:
            prompt_tokens = replayed[0]
        if prompt_tokens + total > c.max_position_embeddings:
            raise ConfigError(f"prompt + tokens exceed the model's context of {c.max_position_embeddings}")
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, c.vocab_size, (prompt_tokens,), generator=generator).tolist()
        stream = torch.randint(3, c.vocab_size, (total,), generator=generator).tolist()
        peak = measure_pinned_peak(engine.device)
        prepare_s = None
        if any(p != "copy" for _, p in pairs):  # repacking is a one-time cost: never inside a timed window
            prepare_s = engine.prepare_runs(progress=options.progress)
        meter = HostLoadMeter().start()
        results = [run_mode(engine, mode, prompt=prompt, stream=stream, warmup=warmup_tokens, tokens=tokens,
                            profile=profile_tokens, placement=placement) for mode, placement in pairs]
        host_load = meter.stop()
        manifest = engine.store.manifest
        return BenchReport(
            store=str(store),
            device=torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
            dtype=str(engine.dtype).removeprefix("torch."),
            expert_bits=manifest.expert_quant.bits,
            group_size=manifest.expert_quant.group_size,
            expert_mb=engine.store.blob_nbytes / 1e6,
            layers=len(c.moe_layers),
            experts=c.num_experts,
            cache_experts=engine.options.cache_experts,
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            pinned_peak_gbps=peak,
            results=results,
            cuda_graphs=engine.options.cuda_graphs and engine.device.type == "cuda",
            host_peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            source=engine.source.name if engine.source.name != "hosts" else "expert hosts " + ",".join(
                sorted(engine.source.bytes_by_origin())),
            runs_elsewhere_on=engine.runs_elsewhere_on,
            prepare_runs_s=prepare_s,
            host_load=host_load,
            routing=replayed[1] if replayed is not None else BenchReport.routing,
        )


def replay_routing(engine: Engine, routing: str | Path, *, decode_steps: int) -> tuple[int, str]:
    """bench --routing: every mode's prompt and decode steps route as the trace did (its
    experts, and its guesses where the mode prefetches; runtime/routing_trace.py). The prompt
    takes the trace's prompt length; past the trace's decode steps, they wrap around. Returns
    (prompt tokens, what the report says about routing)."""
    from ..runtime.routing_trace import RoutingTrace

    trace = RoutingTrace.read(routing)
    engine.replay_routing(trace, source=str(routing))
    notes = [f"{trace.prompt_tokens}-token prompt and {trace.decode_steps} decode steps"]
    if decode_steps > trace.decode_steps:
        notes.append(f"the {decode_steps} decode steps of each mode wrap around the trace's {trace.decode_steps}")
    layers = len(engine.config.moe_layers)
    if layers > trace.moe_layers:
        notes.append(f"the store's {layers} layers with experts cycle the trace's {trace.moe_layers}")
    elif layers < trace.moe_layers:
        notes.append(f"the store's {layers} layers with experts take the first {layers} of the trace's {trace.moe_layers}")
    depth = min(engine.options.depth, trace.lookahead_depth)
    notes.append(f"prefetch replays the recorded guesses to depth {depth} (of {trace.lookahead_depth} recorded), "
                 f"width {trace.lookahead_width}")
    made = trace.made_by.get("model")
    return trace.prompt_tokens, f"replayed from {routing}" + (f" ({made})" if made else "") + ": " + "; ".join(notes)
