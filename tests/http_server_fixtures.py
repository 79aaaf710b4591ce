"""Helpers for the server tests (imported by them; not a conftest): an engine on a tiny store
behind the real app and uvicorn, on 127.0.0.1 and a free port, in a thread of the test process.
Everything started here is stopped by the context manager. conftest.py holds the two servers
that several test files share (session fixtures have to live there)."""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

MODEL_NAME = "tiny"
API_KEY = "shared-test-key"  # the key of conftest's shared_keyed_server


@dataclass
class RunningServer:
    url: str
    engine: object
    app: object

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextmanager
def running_server(store, *, source="ram", **app_options):
    from coordinator.runtime.engine import Engine
    from coordinator.server import BackgroundServer, build_app

    engine = Engine.open(store, source=source, device="cpu", cache_experts=2)
    try:
        app = build_app(engine, model_name=MODEL_NAME, **app_options)
        with BackgroundServer(app) as server:
            yield RunningServer(server.url, engine, app)
    finally:
        engine.close()


def metric_samples(url: str, api_key: str | None = None) -> dict[str, list[tuple[dict, float]]]:
    """/metrics parsed by prometheus-client: sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric(url: str, name: str, api_key: str | None = None, **labels) -> float:
    """The sum of a sample's values over the series that carry `labels`."""
    return sum(value for series, value in metric_samples(url, api_key).get(name, [])
               if all(series.get(k) == v for k, v in labels.items()))


def wait_until(condition, *, timeout_s: float = 10.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def sse_payloads(lines) -> list:
    """The JSON payloads of `data:` lines, and "[DONE]" as it is."""
    out = []
    for line in lines:
        if line.startswith("data:"):
            data = line[len("data:"):].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def closed_port_url() -> str:
    """An address on 127.0.0.1 where nothing listens (a port we bound and let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
