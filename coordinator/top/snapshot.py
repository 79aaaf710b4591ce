"""One scrape of a server's /metrics, parsed with prometheus-client's text parser into the
numbers the view shows. Knows nothing about drawing."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from common.errors import ServerError
from coordinator.runtime.counters import COUNTERS

# LayerCounts field -> sample name, from the one table of the engine's counters
LAYER_FIELDS = {counter.field: counter.metric + "_total" for counter in COUNTERS}


@dataclass
class LayerCounts:
    hits: float = 0.0
    misses: float = 0.0
    prefetch_hits: float = 0.0
    prefetch_issued: float = 0.0
    prefetch_wasted: float = 0.0
    bytes_fetched: float = 0.0


def hit_rate(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses else None


@dataclass
class MetricsSnapshot:
    taken_at: float  # time.monotonic() of the scrape
    model: str = "?"
    tokens_generated: float = 0.0
    last_decode_tokens_per_s: float = 0.0  # of the last finished generation
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    queue_length: float = 0.0
    generating: bool = False
    expert_wait_s: float = 0.0
    requests: dict[str, float] = field(default_factory=dict)  # outcome -> count, all endpoints
    layers: list[LayerCounts] = field(default_factory=list)
    source_bytes: dict[str, float] = field(default_factory=dict)  # ram / disk / host address -> bytes
    hosts_up: dict[str, bool] = field(default_factory=dict)

    @property
    def hits(self) -> float:
        return sum(layer.hits for layer in self.layers)

    @property
    def misses(self) -> float:
        return sum(layer.misses for layer in self.layers)

    @property
    def hit_rate(self) -> float | None:
        return hit_rate(self.hits, self.misses)

    @property
    def mean_ttft_s(self) -> float | None:
        return self.ttft_sum_s / self.ttft_count if self.ttft_count else None


def parse_metrics(text: str, *, taken_at: float | None = None) -> MetricsSnapshot:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))

    def one(name: str) -> float:
        return sum(value for _, value in samples.get(name, []))

    snapshot = MetricsSnapshot(
        taken_at=time.monotonic() if taken_at is None else taken_at,
        tokens_generated=one("moe_edge_tokens_generated_total"),
        last_decode_tokens_per_s=one("moe_edge_tokens_per_second"),
        ttft_sum_s=one("moe_edge_time_to_first_token_seconds_sum"),
        ttft_count=one("moe_edge_time_to_first_token_seconds_count"),
        queue_length=one("moe_edge_queue_length"),
        generating=one("moe_edge_generating") > 0,
        expert_wait_s=one("moe_edge_expert_wait_seconds_total"),
    )
    for labels, _ in samples.get("moe_edge_model_info", []):
        snapshot.model = labels.get("model", "?")
    for labels, value in samples.get("moe_edge_requests_total", []):
        outcome = labels.get("outcome", "?")
        snapshot.requests[outcome] = snapshot.requests.get(outcome, 0.0) + value
    layers: dict[int, LayerCounts] = defaultdict(LayerCounts)
    for name, sample_name in LAYER_FIELDS.items():
        for labels, value in samples.get(sample_name, []):
            setattr(layers[int(labels["layer"])], name, value)
    snapshot.layers = [layers[i] for i in sorted(layers)]
    for labels, value in samples.get("moe_edge_source_bytes_total", []):
        snapshot.source_bytes[labels["source"]] = value
    for labels, value in samples.get("moe_edge_host_up", []):
        snapshot.hosts_up[labels["host"]] = value > 0
    return snapshot


def fetch_snapshot(url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> MetricsSnapshot:
    """url: the server's base address (…/metrics is added)."""
    address = url.rstrip("/").removesuffix("/v1") + "/metrics"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(address, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ServerError(f"cannot reach {address}: {err or type(err).__name__}") from None
    if response.status_code != 200:
        raise ServerError(f"{address}: HTTP {response.status_code}: {response.text[:200]}", status=response.status_code)
    try:
        return parse_metrics(response.text)
    except ValueError as err:
        raise ServerError(f"{address}: not Prometheus text ({err})") from None
