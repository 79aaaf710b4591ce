"""`python -m coordinator top`: one frame (--once) from a real server's /metrics shows tokens/s,
hit rate, per-layer hits and traffic per source; rates and host health come from the scrapes."""

from __future__ import annotations

import httpx
import pytest
from http_server_fixtures import closed_port_url, running_server
from rich.console import Console

from conftest import coordinator_cli
from coordinator.top.snapshot import parse_metrics
from coordinator.top.view import render

KEY = "top-test-key"


@pytest.fixture(scope="module")
def server(store16):
    with running_server(store16, api_key=KEY) as running:
        reply = httpx.post(running.url + "/v1/completions", json={"prompt": "Hello world", "max_tokens": 9, "temperature": 0},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert reply.status_code == 200
        yield running


def test_top_once_prints_tokens_per_s_hit_rate_layers_and_sources(server, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    (tmp_path / "key").write_text(KEY)
    result = coordinator_cli("top", "--url", server.url, "--once", "--api-key-file", tmp_path / "key")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("tokens/s (last request)", "tokens generated", "expert hit rate", "time to first token",
                 "expert cache per layer", "expert traffic per source", "ram", "completed 1"):
        assert text in out, text
    assert "tokens generated         9" in out
    for layer in range(server.engine.config.num_layers):
        assert f"│     {layer} │" in out


def test_top_once_fails_with_one_line_without_the_key_or_the_server(server):
    refused = coordinator_cli("top", "--url", server.url, "--once")
    assert refused.returncode == 5 and "HTTP 401" in refused.stderr and "Traceback" not in refused.stderr
    unreachable = coordinator_cli("top", "--url", closed_port_url(), "--once")
    assert unreachable.returncode == 5 and "cannot reach" in unreachable.stderr


SCRAPE = """\
moe_edge_tokens_generated_total {tokens}
moe_edge_tokens_per_second 41.5
moe_edge_queue_length 2
moe_edge_generating 1
moe_edge_model_info{{model="mixtral",model_id="abc"}} 1
moe_edge_requests_total{{endpoint="/v1/completions",outcome="completed"}} 3
moe_edge_requests_total{{endpoint="/v1/chat/completions",outcome="completed"}} 4
moe_edge_expert_cache_hits_total{{layer="0"}} 30
moe_edge_expert_cache_misses_total{{layer="0"}} 10
moe_edge_expert_cache_hits_total{{layer="1"}} 5
moe_edge_expert_cache_misses_total{{layer="1"}} 5
moe_edge_source_bytes_total{{source="10.0.0.2:50051"}} {host_bytes}
moe_edge_source_bytes_total{{source="ram"}} 0
moe_edge_host_up{{host="10.0.0.2:50051"}} 1
moe_edge_host_up{{host="10.0.0.3:50051"}} 0
"""


def test_the_view_shows_rates_between_scrapes_and_each_hosts_health():
    first = parse_metrics(SCRAPE.format(tokens=100, host_bytes=1e9), taken_at=10.0)
    second = parse_metrics(SCRAPE.format(tokens=150, host_bytes=3e9), taken_at=12.0)
    assert (second.model, second.requests, second.queue_length, second.generating) == ("mixtral", {"completed": 7}, 2, True)
    assert second.hit_rate == 35 / 50
    console = Console(record=True, width=120)
    console.print(render(second, first, url="http://x"))
    frame = console.export_text()
    assert "tokens/s now             25.0" in frame
    assert "70.0% (35 hits, 15 misses)" in frame
    assert "generating, 2 waiting" in frame
    host_rows = {line.split("│")[1].strip(): line for line in frame.splitlines() if "10.0.0." in line}
    assert "1.0 GB/s" in host_rows["10.0.0.2:50051"] and "up" in host_rows["10.0.0.2:50051"]
    assert "DOWN" in host_rows["10.0.0.3:50051"]
