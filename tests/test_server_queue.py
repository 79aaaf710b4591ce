"""One request generates at a time; the rest wait in a bounded queue. Concurrent requests get
their own, correct outputs; a request past the bound gets 429; a client that leaves (streamed,
non-streamed, or still waiting) frees its place at once and the next request runs."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from http_server_fixtures import MODEL_NAME, metric, running_server

LONG = 1900  # tokens: several seconds on CPU; the tiny model's context is 2048
LONG_STREAM = {"prompt": "Hello", "max_tokens": LONG, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server  # its queue holds 16, room for the ten concurrent requests


async def eventually(condition, *, timeout_s: float = 20.0, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def data_lines(lines, count: int) -> list[str]:
    """The next `count` data lines of a response's `aiter_lines()`. Keep that iterator referenced
    while the stream should stay open: a collected one closes the connection."""
    found = []
    while len(found) < count:
        line = await lines.__anext__()
        if line.startswith("data:"):
            found.append(line)
    return found


async def test_ten_concurrent_streamed_requests_complete_with_their_own_outputs(server):
    words = ["Hello", "The quick", "Numbers", "A home lab", "Mixture", "When the router", "One two", "The weather",
             "If one computer", "Each one"]
    settings = [dict(temperature=0) if i % 2 == 0 else dict(temperature=0.8, seed=100 + i) for i in range(10)]
    references = []
    for word, setting in zip(words, settings):  # sequentially, on the same engine, before the server is busy
        greedy = setting["temperature"] == 0
        generation = server.engine.generate(word, max_new_tokens=12, greedy=greedy,
                                            temperature=1.0 if greedy else setting["temperature"], seed=setting.get("seed"))
        references.append("".join(generation))
    assert len(set(references)) >= 5  # the outputs differ, so a mix-up would show

    async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", timeout=120, max_retries=0) as sdk:
        async def one(word: str, setting: dict) -> list[str]:
            stream = await sdk.completions.create(model=MODEL_NAME, prompt=word, max_tokens=12, stream=True, **setting)
            return [chunk.choices[0].text async for chunk in stream if chunk.choices and chunk.choices[0].text]

        results = await asyncio.wait_for(asyncio.gather(*(one(w, s) for w, s in zip(words, settings))), timeout=120)
    for pieces, reference in zip(results, references):
        assert len(pieces) >= 2
        assert "".join(pieces) == reference
    assert metric(server.url, "moe_edge_queue_length") == 0


async def test_a_client_dropped_mid_stream_frees_its_place_and_the_next_request_runs(server):
    dropped_before = metric(server.url, "moe_edge_requests_total", outcome="client_disconnected")
    tokens_before = metric(server.url, "moe_edge_tokens_generated_total")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=LONG_STREAM) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert len(await data_lines(lines, 3)) == 3
            assert metric(server.url, "moe_edge_generating") == 1
        # leaving the block closes the connection mid-stream
    await eventually(lambda: metric(server.url, "moe_edge_generating") == 0, what="the dropped generation to stop")
    assert metric(server.url, "moe_edge_requests_total", outcome="client_disconnected") == dropped_before + 1
    assert metric(server.url, "moe_edge_tokens_generated_total") - tokens_before < LONG / 4  # stopped early, not finished

    reference = "".join(server.engine.generate("The quick", max_new_tokens=8))
    async with openai.AsyncOpenAI(base_url=server.v1, api_key="unused", timeout=60, max_retries=0) as sdk:
        reply = await sdk.completions.create(model=MODEL_NAME, prompt="The quick", max_tokens=8, temperature=0)
    assert reply.choices[0].text == reference


async def test_a_non_streamed_client_that_leaves_stops_its_generation(server):
    dropped_before = metric(server.url, "moe_edge_requests_total", outcome="client_disconnected")
    tokens_before = metric(server.url, "moe_edge_tokens_generated_total")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        request = asyncio.create_task(http.post("/v1/completions", json={**LONG_STREAM, "stream": False}))
        await eventually(lambda: metric(server.url, "moe_edge_tokens_generated_total") > tokens_before, what="generation to start")
        request.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await request
    await eventually(lambda: metric(server.url, "moe_edge_generating") == 0, what="the abandoned generation to stop")
    assert metric(server.url, "moe_edge_requests_total", outcome="client_disconnected") == dropped_before + 1
    assert metric(server.url, "moe_edge_tokens_generated_total") - tokens_before < LONG / 4


async def test_past_the_queue_bound_requests_get_429_and_a_waiting_client_that_leaves_frees_its_place(store16):
    with running_server(store16, max_queue=1) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=LONG_STREAM) as generating:
                first_lines = generating.aiter_lines()
                await data_lines(first_lines, 1)  # it is generating now

                async def wait_in_line() -> None:
                    async with http.stream("POST", "/v1/completions", json=LONG_STREAM) as waiting:
                        assert waiting.status_code == 200
                        await data_lines(waiting.aiter_lines(), 1)

                waiter = asyncio.create_task(wait_in_line())
                await eventually(lambda: metric(server.url, "moe_edge_queue_length") == 1, what="the second request to queue")

                refused = await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
                refused_stream = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
                for response in (refused, refused_stream):
                    assert response.status_code == 429
                    error = response.json()["error"]
                    assert error["type"] == "rate_limit_error" and "--max-queue 1" in error["message"]

                waiter.cancel()  # the waiting client leaves
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                await eventually(lambda: metric(server.url, "moe_edge_queue_length") == 0, what="the queue to empty")
                assert metric(server.url, "moe_edge_generating") == 1  # the first one still runs
            await eventually(lambda: metric(server.url, "moe_edge_generating") == 0, what="the first request to stop")

            reply = await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        assert metric(server.url, "moe_edge_requests_total", outcome="queue_full") == 2
        assert metric(server.url, "moe_edge_requests_total", outcome="client_disconnected") == 2
