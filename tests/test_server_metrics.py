"""GET /metrics: parses with prometheus-client's text parser, its counters move after a request,
and it shows per-layer cache numbers, bytes per source or host, and host up/down."""

from __future__ import annotations

import httpx
import pytest
from http_server_fixtures import metric, metric_samples, running_server

from common.expert_id import ExpertId
from common.store.reader import ExpertStore
from coordinator.sources.local import RamSource

HOSTS = {"10.0.0.2:50051": True, "10.0.0.3:50051": False}


@pytest.fixture(scope="module")
def server(store16):
    with running_server(store16) as running:
        yield running


def layer_totals(samples: dict, name: str) -> dict[str, float]:
    return {labels["layer"]: value for labels, value in samples.get(name, [])}


def test_metrics_parse_with_prometheus_client_and_counters_move_after_a_request(server):
    response = httpx.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    before = metric_samples(server.url)
    layers = server.engine.config.num_layers
    assert len(layer_totals(before, "moe_edge_expert_cache_hits_total")) == layers
    for name in ("moe_edge_queue_length", "moe_edge_generating", "moe_edge_tokens_per_second",
                 "moe_edge_time_to_first_token_seconds_count", "moe_edge_expert_prefetch_issued_total",
                 "moe_edge_expert_bytes_loaded_total", "moe_edge_source_bytes_total", "moe_edge_model_info"):
        assert name in before, name

    reply = httpx.post(server.url + "/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0},
                       timeout=60)
    assert reply.status_code == 200
    after = metric_samples(server.url)

    def total(samples, name, **labels):
        return sum(v for series, v in samples.get(name, []) if all(series.get(k) == w for k, w in labels.items()))

    assert total(after, "moe_edge_tokens_generated_total") - total(before, "moe_edge_tokens_generated_total") == 10
    assert total(after, "moe_edge_prompt_tokens_total") - total(before, "moe_edge_prompt_tokens_total") == reply.json()["usage"]["prompt_tokens"]
    assert total(after, "moe_edge_requests_total", outcome="completed") == total(before, "moe_edge_requests_total", outcome="completed") + 1
    assert total(after, "moe_edge_time_to_first_token_seconds_count") == total(before, "moe_edge_time_to_first_token_seconds_count") + 1
    assert total(after, "moe_edge_decode_seconds_total") > total(before, "moe_edge_decode_seconds_total")
    assert total(after, "moe_edge_tokens_per_second") > 0
    uses_before = {k: v + layer_totals(before, "moe_edge_expert_cache_misses_total")[k]
                   for k, v in layer_totals(before, "moe_edge_expert_cache_hits_total").items()}
    uses_after = {k: v + layer_totals(after, "moe_edge_expert_cache_misses_total")[k]
                  for k, v in layer_totals(after, "moe_edge_expert_cache_hits_total").items()}
    top_k = server.engine.config.top_k
    for layer in uses_after:  # every token of prompt and reply uses top_k experts of every layer
        assert uses_after[layer] - uses_before[layer] >= top_k * 10
    assert total(after, "moe_edge_source_bytes_total", source="ram") > total(before, "moe_edge_source_bytes_total", source="ram")


def test_metrics_live_in_their_own_registry_not_the_global_one(server):
    from prometheus_client import REGISTRY, generate_latest

    assert b"moe_edge_" not in generate_latest(REGISTRY)


class TwoHostSource:
    """Serves blobs from RAM but reports them as coming from two expert hosts, one of them down
    (the shape of the gRPC pool's bytes_by_origin and host_status)."""

    def __init__(self, store, fetch_loop) -> None:
        # the engine opens the store without expert files for a custom source: the "hosts" read them
        self.inner = RamSource(ExpertStore(store.folder), pin=False, progress=False)
        self.name = "two-hosts"
        self.blob_nbytes = self.inner.blob_nbytes
        self._bytes = {host: 0 for host in HOSTS}

    def resident_blob(self, eid: ExpertId):
        return None

    async def fetch_into(self, eid: ExpertId, out) -> None:
        await self.inner.fetch_into(eid, out)
        self._bytes["10.0.0.2:50051"] += self.blob_nbytes

    def bytes_by_origin(self) -> dict[str, int]:
        return dict(self._bytes)

    def host_status(self) -> dict[str, bool]:
        return dict(HOSTS)

    def close(self) -> None:
        self.inner.close()


def test_metrics_show_bytes_per_host_and_whether_each_host_is_up(store16):
    with running_server(store16, source=TwoHostSource) as server:
        before = metric(server.url, "moe_edge_source_bytes_total", source="10.0.0.2:50051")
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60).status_code == 200
        assert metric(server.url, "moe_edge_source_bytes_total", source="10.0.0.2:50051") > before
        assert metric(server.url, "moe_edge_host_up", host="10.0.0.2:50051") == 1
        assert metric(server.url, "moe_edge_host_up", host="10.0.0.3:50051") == 0


def test_a_source_without_host_status_shows_no_host_up_series(server):
    assert "moe_edge_host_up" not in metric_samples(server.url)
