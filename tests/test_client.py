"""coordinator.server.client.Client against a real server: streamed pieces join to the whole reply,
settings reach the server, and failures come back as clear ServerErrors."""

from __future__ import annotations

import asyncio

import pytest
from http_server_fixtures import API_KEY as KEY
from http_server_fixtures import closed_port_url, metric, wait_until

from common.errors import QueueFullError, ServerError
from coordinator.server.client import Client

MESSAGES = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def server(shared_keyed_server):
    return shared_keyed_server  # its queue holds none: a second request while one generates gets 429


@pytest.fixture
def client(server):
    return Client(server.url, api_key=KEY, timeout_s=60)


async def test_stream_yields_pieces_that_join_to_the_completion(client):
    pieces = [piece async for piece in client.stream("Hello world", max_tokens=12, temperature=0)]
    whole = client.complete("Hello world", max_tokens=12, temperature=0)
    assert len(pieces) >= 2
    assert "".join(pieces) == whole.text
    assert (whole.finish_reason, whole.completion_tokens) == ("length", 12)


async def test_chat_stream_yields_pieces_that_join_to_the_chat_reply(client):
    pieces = [piece async for piece in client.chat_stream(MESSAGES, max_tokens=12, temperature=0.7, seed=5)]
    whole = client.chat(MESSAGES, max_tokens=12, temperature=0.7, seed=5)
    assert len(pieces) >= 2
    assert "".join(pieces) == whole.text


async def test_stop_reaches_the_server(client, server):
    reference = client.complete("Hello world", max_tokens=12, temperature=0).text
    stop = reference[4:7]
    reply = client.complete("Hello world", max_tokens=12, temperature=0, stop=stop)
    assert reply.text == reference[: reference.index(stop)] and reply.finish_reason == "stop"
    assert "".join([p async for p in client.stream("Hello world", max_tokens=12, temperature=0, stop=[stop])]) == reply.text


async def test_a_refused_request_raises_server_error_with_the_servers_message(client, server):
    with pytest.raises(ServerError, match="temperature") as refused:
        client.complete("Hello", temperature=7)
    assert refused.value.status == 400
    with pytest.raises(ServerError, match="HTTP 400"):
        [p async for p in client.stream("Hello", top_p=0)]


async def test_a_missing_key_raises_server_error_401(server):
    with pytest.raises(ServerError, match="API key") as refused:
        Client(server.url).complete("Hello", max_tokens=2)
    assert refused.value.status == 401


async def test_an_unreachable_server_raises_server_error():
    url = closed_port_url()
    with pytest.raises(ServerError, match="cannot reach"):
        Client(url, timeout_s=5).complete("Hello")
    with pytest.raises(ServerError, match="cannot reach"):
        [p async for p in Client(url, timeout_s=5).stream("Hello")]


async def test_a_full_queue_raises_queue_full_error(client, server):
    async def long_stream() -> None:
        async for _ in client.stream("Hello", max_tokens=1900, temperature=0):
            pass

    task = asyncio.create_task(long_stream())
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while metric(server.url, "moe_edge_generating", api_key=KEY) != 1:
            assert asyncio.get_running_loop().time() < deadline, "the long request never started"
            await asyncio.sleep(0.02)
        with pytest.raises(QueueFullError, match="busy"):
            client.complete("Hello", max_tokens=2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the shared server's next user would get 429 while the abandoned generation runs
        await asyncio.to_thread(wait_until, lambda: metric(server.url, "moe_edge_generating", api_key=KEY) == 0,
                                what="the abandoned generation to stop")
