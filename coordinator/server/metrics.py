"""What GET /metrics shows, in Prometheus' text format, from a registry of our own (never the
process-global one, so two servers in one process do not mix their numbers).

Two kinds of numbers:
- per request, counted by the server as generations run: requests by outcome, tokens generated
  (as they are made, so a live view sees them move), decode speed, time to first token (queueing
  included), queue wait;
- the engine's lifetime counters, read at each scrape: expert cache hits / misses / prefetches
  and bytes loaded per layer, bytes delivered per source (file tier or expert host), and whether
  each expert host is up (when the source can tell).

Metric names start with `moe_edge_`; `layer`, `source` and `host` are the label names."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.runtime.counters import COUNTERS

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

class EngineCollector(Collector):
    """Reads the engine's lifetime counters at scrape time, through one Engine.snapshot()
    (runtime/counters.py names each counter's metric once)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        snapshot = self.engine.snapshot()
        for counter in COUNTERS:
            family = CounterMetricFamily(counter.metric, counter.help, labels=["layer"])
            for layer, value in enumerate(snapshot.per_layer[counter.field]):
                family.add_metric([str(layer)], value)
            yield family
        yield CounterMetricFamily("moe_edge_expert_wait_seconds", "Time the token loop waited on expert loads.",
                                  value=snapshot.wait_s)
        yield CounterMetricFamily("moe_edge_expert_run_wait_seconds",
                                  "Time the token loop waited on experts run where they live (placement run/auto), "
                                  "after issuing the device's experts (this CPU's runs: their compute).", value=snapshot.run_wait_s)
        by_source = CounterMetricFamily("moe_edge_source_bytes",
                                        "Expert bytes delivered per source: ram, disk, or an expert host's address.",
                                        labels=["source"])
        for origin, count in sorted(snapshot.bytes_by_source.items()):
            by_source.add_metric([origin], count)
        yield by_source
        if snapshot.run_seconds_by_source:
            seconds = CounterMetricFamily("moe_edge_run_experts_seconds",
                                          "Time waiting on expert hosts running experts (RunExperts), per host.",
                                          labels=["host"])
            sent = CounterMetricFamily("moe_edge_run_experts_bytes",
                                       "Bytes of RunExperts calls (activations sent, sums received), per host.",
                                       labels=["host"])
            computing = CounterMetricFamily("moe_edge_run_experts_host_compute_seconds",
                                            "Of the RunExperts time, what each host said it spent computing.",
                                            labels=["host"])
            for host in sorted(snapshot.run_seconds_by_source):
                seconds.add_metric([host], snapshot.run_seconds_by_source[host])
                sent.add_metric([host], snapshot.run_bytes_by_source.get(host, 0))
                computing.add_metric([host], snapshot.run_compute_seconds_by_source.get(host, 0.0))
            yield seconds
            yield sent
            yield computing
        if "cpu" in snapshot.run_compute_seconds_by_source:  # placement run/auto on this machine's CPU
            yield CounterMetricFamily("moe_edge_cpu_expert_run_seconds",
                                      "Time this machine's CPU spent running experts where they live.",
                                      value=snapshot.run_compute_seconds_by_source["cpu"])
        if snapshot.hosts_up:
            up = GaugeMetricFamily("moe_edge_host_up", "1 if the expert host answers, 0 if not.", labels=["host"])
            for host, is_up in sorted(snapshot.hosts_up.items()):
                up.add_metric([host], 1.0 if is_up else 0.0)
            yield up


class ServerMetrics:
    def __init__(self, engine, *, model_name: str, queue_length: Callable[[], int], generating: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("moe_edge_requests", "Requests by endpoint and outcome.", ["endpoint", "outcome"], registry=registry)
        self.tokens_generated = Counter("moe_edge_tokens_generated", "Tokens generated, counted as they are made.", registry=registry)
        self.prompt_tokens = Counter("moe_edge_prompt_tokens", "Prompt tokens read (prefill).", registry=registry)
        self.decode_seconds = Counter("moe_edge_decode_seconds", "Time spent in decode steps (after the first token).", registry=registry)
        self.tokens_per_second = Gauge("moe_edge_tokens_per_second", "Decode speed of the last finished generation.", registry=registry)
        self.time_to_first_token = Histogram("moe_edge_time_to_first_token_seconds",
                                             "From a request's arrival to its first token, queueing included.",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("moe_edge_queue_wait_seconds", "Time requests waited for their turn.",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        Gauge("moe_edge_queue_length", "Requests waiting for their turn.", registry=registry).set_function(queue_length)
        Gauge("moe_edge_generating", "1 while a request is generating.", registry=registry).set_function(generating)
        info = Gauge("moe_edge_model_info", "The model this server runs (always 1).", ["model", "model_id"], registry=registry)
        info.labels(model=model_name, model_id=engine.store.manifest.model_id).set(1)
        registry.register(EngineCollector(engine))

    def count_request(self, endpoint: str, outcome: str) -> None:
        """outcome: completed, client_disconnected, invalid_request, unauthorized, queue_full, error."""
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
