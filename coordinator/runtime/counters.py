"""The engine's counters, in one type, and the snapshot everyone reads them through.

`ExpertCounters` is what the expert cache counts, per layer, as it works. `EngineSnapshot` is a
frozen copy of those counters plus what the source delivered (bytes and experts per origin)
and which expert hosts are up: `Engine.snapshot()` makes one, and the generation stats, the
CLI's `--json`, the server's `/metrics` and `bench` all read snapshots (a later one minus an
earlier one for what happened in between). `COUNTERS` names each per-layer counter once: its
field, its Prometheus metric and its meaning. Imports no torch.

Every expert use is a hit (resident or already loading), a miss (copied in), or, with placement
run/auto, a run elsewhere; prefetch_hits are the hits on experts a prefetch brought in and
nothing had used yet."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CounterInfo:
    field: str  # ExpertCounters attribute and the stats' key stem
    metric: str  # Prometheus name (without _total)
    help: str


COUNTERS = (
    CounterInfo("hits", "moe_edge_expert_cache_hits",
                "Expert uses served by an expert already in (or loading into) the device cache."),
    CounterInfo("misses", "moe_edge_expert_cache_misses", "Expert uses that had to wait for a load."),
    CounterInfo("prefetch_hits", "moe_edge_expert_prefetch_hits", "Cache hits on experts that a prefetch brought in."),
    CounterInfo("prefetch_issued", "moe_edge_expert_prefetch_issued", "Expert loads started by the prefetcher."),
    CounterInfo("prefetch_wasted", "moe_edge_expert_prefetch_wasted", "Prefetched experts evicted before any use."),
    CounterInfo("prefetch_left", "moe_edge_expert_prefetch_left_to_run",
                "Guesses not prefetched under placement auto: the copy would have landed too late, so a use runs where it lives."),
    CounterInfo("bytes_fetched", "moe_edge_expert_bytes_loaded", "Bytes copied into the device expert cache."),
    CounterInfo("runs_elsewhere", "moe_edge_expert_runs_elsewhere",
                "Expert uses run where the expert lives (the coordinator's CPU) instead of on the device."),
)
COUNTER_FIELDS = tuple(c.field for c in COUNTERS)


class ExpertCounters:
    """Per-layer counts, written by the cache on the GPU loop's thread. Other threads read them
    only through `snapshot()` (plain reads: a snapshot taken mid-token may see one layer a step
    ahead of another, which counters tolerate)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.hits = [0] * num_layers
        self.misses = [0] * num_layers
        self.prefetch_hits = [0] * num_layers
        self.prefetch_issued = [0] * num_layers
        self.prefetch_wasted = [0] * num_layers
        self.prefetch_left = [0] * num_layers  # guesses placement auto did not copy (placement.py)
        self.bytes_fetched = [0] * num_layers
        self.runs_elsewhere = [0] * num_layers  # uses that neither hit nor missed: placement ran them elsewhere
        self.wait_s = 0.0  # time the token loop waited on expert loads
        self.run_wait_s = 0.0  # time the token loop waited on experts run elsewhere, after the device's were issued (this CPU's runs: their compute)


@dataclass(frozen=True)
class EngineSnapshot:
    per_layer: dict[str, tuple[int, ...]]  # COUNTER_FIELDS -> one count per layer
    wait_s: float
    bytes_by_source: dict[str, int]  # ram / disk / an expert host's address -> bytes delivered
    fetches_by_source: dict[str, int]  # the same, in experts delivered (one blob each)
    hosts_up: dict[str, bool] = field(default_factory=dict)  # expert host address -> answering
    run_seconds_by_source: dict[str, float] = field(default_factory=dict)  # waiting on RunExperts, per host
    run_bytes_by_source: dict[str, int] = field(default_factory=dict)  # RunExperts bytes, sent + received, per host
    run_bytes_received_by_source: dict[str, int] = field(default_factory=dict)  # of those, the sums received
    run_wait_s: float = 0.0  # time the token loop waited on runs elsewhere (the CPU's or a host's)
    run_compute_seconds_by_source: dict[str, float] = field(default_factory=dict)  # of run_seconds, the hosts' own compute

    @classmethod
    def take(cls, counters: ExpertCounters, bytes_by_source: dict[str, int], blob_nbytes: int,
             hosts_up: dict[str, bool], run_seconds: dict[str, float] | None = None,
             run_bytes: dict[str, int] | None = None,
             run_bytes_received: dict[str, int] | None = None,
             run_compute_seconds: dict[str, float] | None = None) -> "EngineSnapshot":
        return cls(
            per_layer={name: tuple(getattr(counters, name)) for name in COUNTER_FIELDS},
            wait_s=counters.wait_s,
            bytes_by_source=dict(bytes_by_source),
            fetches_by_source={origin: count // blob_nbytes for origin, count in bytes_by_source.items()},
            hosts_up=dict(hosts_up),
            run_seconds_by_source=dict(run_seconds or {}),
            run_bytes_by_source=dict(run_bytes or {}),
            run_bytes_received_by_source=dict(run_bytes_received or {}),
            run_wait_s=counters.run_wait_s,
            run_compute_seconds_by_source=dict(run_compute_seconds or {}),
        )

    def total(self, name: str) -> int:
        return sum(self.per_layer[name])

    def since(self, earlier: "EngineSnapshot") -> "EngineSnapshot":
        """What happened between `earlier` and this snapshot (host health is this one's)."""

        def minus(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
            return {key: value - before.get(key, 0) for key, value in now.items()}

        return EngineSnapshot(
            per_layer={name: tuple(a - b for a, b in zip(values, earlier.per_layer[name]))
                       for name, values in self.per_layer.items()},
            wait_s=self.wait_s - earlier.wait_s,
            bytes_by_source=minus(self.bytes_by_source, earlier.bytes_by_source),
            fetches_by_source=minus(self.fetches_by_source, earlier.fetches_by_source),
            hosts_up=self.hosts_up,
            run_seconds_by_source=minus(self.run_seconds_by_source, earlier.run_seconds_by_source),
            run_bytes_by_source=minus(self.run_bytes_by_source, earlier.run_bytes_by_source),
            run_bytes_received_by_source=minus(self.run_bytes_received_by_source, earlier.run_bytes_received_by_source),
            run_wait_s=self.run_wait_s - earlier.run_wait_s,
            run_compute_seconds_by_source=minus(self.run_compute_seconds_by_source,
                                                earlier.run_compute_seconds_by_source),
        )

    @property
    def uses(self) -> int:
        """Every expert use: on the device (a hit or a miss) or run elsewhere."""
        return self.total("hits") + self.total("misses") + self.total("runs_elsewhere")

    @property
    def experts_copied(self) -> int:
        """Every copy into the cache: demand misses and prefetches."""
        return self.total("misses") + self.total("prefetch_issued")
