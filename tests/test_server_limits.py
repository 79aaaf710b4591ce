"""The HTTP server under hostile input: a body over --max-request-bytes gets 413 before it is read
whole (with or without Content-Length); a near-limit prompt is tokenized off the event loop, so
/health keeps answering; memory comes back after large requests; every sampling setting in its
range answers 200, and every one out of range answers 400 naming it, never 500."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import psutil
import pytest

from conftest import coordinator_cli
from http_server_fixtures import MODEL_NAME, running_server

SMALL_LIMIT = 256 << 10
GREEDY = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server(store16):
    with running_server(store16) as running:  # the default limit, 4 MiB
        yield running


@pytest.fixture(scope="module")
def small_server(store16):
    with running_server(store16, max_request_bytes=SMALL_LIMIT) as running:
        yield running


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    return error


def assert_still_serves(url: str) -> None:
    reply = httpx.post(url + "/v1/completions", json=GREEDY, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 6


# --- raw HTTP/1.1, to send a body the way a client library would not ------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one response with a Content-Length; bounded by the socket timeout."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-response"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _request_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_body_whose_content_length_is_over_the_limit_gets_413_before_it_is_sent(small_server):
    with _connect(small_server.url) as sock:
        sock.sendall(_request_head("/v1/completions", f"Content-Length: {SMALL_LIMIT + 1}"))
        status, _, body = _read_response(sock)  # not a byte of the body sent
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and str(SMALL_LIMIT) in error["message"]
    assert_still_serves(small_server.url)


def test_a_client_that_expects_100_continue_is_refused_before_sending_its_body(small_server):
    with _connect(small_server.url) as sock:
        sock.sendall(_request_head("/v1/completions", f"Content-Length: {50 << 20}", "Expect: 100-continue"))
        status, _, _ = _read_response(sock)
    assert status == 413


def test_a_chunked_body_over_the_limit_gets_413_without_being_read_whole(small_server):
    piece = b"x" * (64 << 10)
    with _connect(small_server.url) as sock:
        sock.sendall(_request_head("/v1/completions", "Transfer-Encoding: chunked"))
        sock.sendall(b'%x\r\n{"prompt": "\r\n' % len(b'{"prompt": "'))
        for _ in range(SMALL_LIMIT // len(piece) + 2):  # past the limit, and the body never ends
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, _, body = _read_response(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert_still_serves(small_server.url)


def test_an_ordinary_client_sending_too_much_sees_413_in_the_openai_format(small_server):
    too_big = {"prompt": "word " * (SMALL_LIMIT // 5 + 10), "max_tokens": 2}
    assert_openai_error(httpx.post(small_server.url + "/v1/completions", json=too_big, timeout=30), 413)

    def chunks():
        yield b'{"prompt": "'
        for _ in range(SMALL_LIMIT // 4096 + 2):
            yield b"w" * 4096
        yield b'"}'

    try:
        response = httpx.post(small_server.url + "/v1/chat/completions", content=chunks(), timeout=30)
        assert_openai_error(response, 413)
    except httpx.TransportError:
        pass  # the server may close before the client finished writing: the answer is still not a 500
    assert_still_serves(small_server.url)


def test_a_body_just_under_the_limit_is_read_and_answered(small_server):
    prompt = "Hello world " * ((SMALL_LIMIT - 200) // 12)
    response = httpx.post(small_server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
    error = assert_openai_error(response, 400)
    assert "context" in error["message"]  # read whole, tokenized, and refused for the context, not the size


# --- big prompts do not freeze the server ---------------------------------------------------


def _near_limit_bodies() -> list[bytes]:
    limit = 4 << 20
    words = "The quick brown fox jumps over the lazy dog. "
    text = json.dumps({"prompt": words * ((limit - 4096) // len(words)), "max_tokens": 2}).encode()
    chat = json.dumps({"messages": [{"role": "user", "content": words * ((limit - 4096) // len(words))}]}).encode()
    ids = json.dumps({"prompt": [1] * ((limit - 4096) // 3), "max_tokens": 2}).encode()
    assert all(len(body) < limit for body in (text, chat, ids))
    return [(path, body) for path, body in
            (("/v1/completions", text), ("/v1/chat/completions", chat), ("/v1/completions", ids))]


def test_health_answers_quickly_while_near_limit_prompts_are_handled(server):
    bodies = _near_limit_bodies()
    answers: list[httpx.Response] = []

    def send_all() -> None:
        with httpx.Client(timeout=120) as client:
            for path, body in bodies:
                answers.append(client.post(server.url + path, content=body, headers={"Content-Type": "application/json"}))

    sender = threading.Thread(target=send_all, daemon=True)
    latencies = []
    with httpx.Client(timeout=10) as client:
        client.get(server.url + "/health")  # connected before the big ones start
        sender.start()
        deadline = time.monotonic() + 120
        while sender.is_alive() and time.monotonic() < deadline:
            started = time.perf_counter()
            assert client.get(server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    sender.join(10)
    print(f"/health while near-limit prompts were handled: {len(latencies)} polls, "
          f"max {max(latencies) * 1000:.0f} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    assert len(answers) == len(bodies)
    for response in answers:  # each far over the tiny model's context of 2048 tokens
        assert "context" in assert_openai_error(response, 400)["message"]
    assert max(latencies) < 0.5
    assert_still_serves(server.url)


def test_memory_comes_back_after_large_requests(server):
    process = psutil.Process()
    assert_still_serves(server.url)
    bodies = _near_limit_bodies()
    for path, body in bodies:  # once to warm every path up
        httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=120)
    before = process.memory_info().rss
    peak = before
    for _ in range(3):
        for path, body in bodies:
            httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=120)
            peak = max(peak, process.memory_info().rss)
    time.sleep(0.2)  # the trim runs in a worker thread once the response went out
    after = process.memory_info().rss
    print(f"RSS around 9 near-4-MiB requests: before {before >> 20} MiB, peak seen {peak >> 20} MiB, "
          f"after {after >> 20} MiB")
    assert after - before < 64 << 20


# --- sampling settings over HTTP ------------------------------------------------------------


def _text(server, **settings) -> str:
    response = httpx.post(server.url + "/v1/completions", json={**GREEDY, **settings}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 6
    return response.json()["choices"][0]["text"]


def test_any_temperature_in_range_answers_200_and_a_tiny_one_is_greedy(server):
    greedy = _text(server)
    assert _text(server, temperature=1e-40, seed=1) == greedy
    for temperature in (1e-5, 0.5, 2):
        _text(server, temperature=temperature, seed=1)


def test_a_seed_beyond_64_bits_is_reduced_modulo_2_to_the_64(server):
    big = _text(server, temperature=1.5, seed=2**70 + 3)
    assert big == _text(server, temperature=1.5, seed=3)
    _text(server, temperature=1.5, seed=-(2**70))


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "Hello", "temperature": -1}', "temperature"),
    (b'{"prompt": "Hello", "temperature": 3}', "temperature"),
    (b'{"prompt": "Hello", "temperature": 1e999}', "temperature"),  # JSON has no inf: this is how it comes
    (b'{"prompt": "Hello", "temperature": -1e999}', "temperature"),
    (b'{"prompt": "Hello", "temperature": NaN}', "temperature"),
    (b'{"prompt": "Hello", "top_p": 0}', "top_p"),
    (b'{"prompt": "Hello", "top_p": 1.5}', "top_p"),
    (b'{"prompt": "Hello", "top_p": 1e999}', "top_p"),
    (b'{"prompt": "Hello", "seed": 1.5}', "seed"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', "temperature"),
])
def test_out_of_range_sampling_settings_get_400_naming_them(server, raw, param):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    response = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert_openai_error(response, 400, param)


def test_an_integer_too_long_for_python_gets_400_not_500(server):
    raw = b'{"prompt": "Hello", "seed": ' + b"9" * 5000 + b"}"
    response = httpx.post(server.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert_openai_error(response, 400)


def test_an_empty_text_prompt_gets_400(server):
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "", "max_tokens": 2}, timeout=30)
    assert_openai_error(response, 400)


def test_serve_refuses_a_max_request_bytes_below_one_in_one_line(store16):
    result = coordinator_cli("serve", "--store", store16, "--listen", "127.0.0.1:0", "--max-request-bytes", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --max-request-bytes 0: must be at least 1"]


def test_the_openai_package_sees_a_413_as_an_api_status_error(small_server):
    import openai

    sdk = openai.OpenAI(base_url=small_server.v1, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.completions.create(model=MODEL_NAME, prompt="word " * (SMALL_LIMIT // 5 + 10), max_tokens=2)
    assert caught.value.status_code == 413
