"""Bad requests get an OpenAI-format error with the right status (400 malformed or out of range,
401 without the key, 404 unknown path) and the server keeps serving after each."""

from __future__ import annotations

import httpx
import openai
import pytest
from flaky_source import FlakySource
from http_server_fixtures import API_KEY as KEY
from http_server_fixtures import MODEL_NAME, metric, running_server

GOOD = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def keyed_server(shared_keyed_server):
    return shared_keyed_server


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def assert_still_serves(url: str, headers: dict | None = None) -> None:
    reply = httpx.post(url + "/v1/completions", json=GOOD, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body", [b'{"prompt": "Hello", "max_tokens": ', b"not json at all", b""])
def test_malformed_json_gets_400_in_the_openai_format_and_the_server_keeps_serving(server, body):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=10)
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert_still_serves(server.url)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "Hello", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "Hello", "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": "Hello", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "Hello", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hello", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "Hello", "stop": [str(i) for i in range(9)]}, "stop"),
    ("/v1/completions", {"prompt": "Hello", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9], "max_tokens": 3}, None),  # a token id outside the vocabulary
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 5000}, None),  # past the model's context of 2048
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_out_of_range_parameters_get_400_naming_the_field_and_the_server_keeps_serving(server, path, body, param):
    error = assert_openai_error(httpx.post(server.url + path, json=body, timeout=10), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert_still_serves(server.url)


def test_the_openai_package_sees_bad_request_for_an_out_of_range_temperature(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", timeout=30, max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError, match="temperature"):
            sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], temperature=9)
        assert sdk.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_refusals_are_counted_by_outcome(server):
    before = metric(server.url, "moe_edge_requests_total", endpoint="/v1/completions", outcome="invalid_request")
    httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "top_p": 7}, timeout=10)
    assert metric(server.url, "moe_edge_requests_total", endpoint="/v1/completions", outcome="invalid_request") == before + 1


def test_unknown_path_gets_404_in_the_openai_format(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing-here", timeout=10), 404)
    assert_openai_error(httpx.get(server.url + "/v1/completions", timeout=10), 405)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_a_missing_or_wrong_key_gets_401_and_the_server_keeps_serving(keyed_server, headers):
    for path, body in (("/v1/completions", GOOD), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        error = assert_openai_error(httpx.post(keyed_server.url + path, json=body, headers=headers, timeout=10), 401)
        assert error["code"] == "invalid_api_key"
    assert httpx.get(keyed_server.url + "/metrics", headers=headers, timeout=10).status_code == 401
    assert httpx.get(keyed_server.url + "/v1/models", headers=headers, timeout=10).status_code == 401
    assert_still_serves(keyed_server.url, {"Authorization": f"Bearer {KEY}"})


def test_the_key_is_checked_before_the_body_is_read(keyed_server):
    response = httpx.post(keyed_server.url + "/v1/completions", content=b"{broken", timeout=10)
    assert_openai_error(response, 401)


def test_health_needs_no_key_and_the_openai_package_works_with_it(keyed_server):
    assert httpx.get(keyed_server.url + "/health", timeout=10).json()["status"] == "ok"
    with openai.OpenAI(base_url=keyed_server.v1, api_key="wrong", timeout=30, max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
    with openai.OpenAI(base_url=keyed_server.v1, api_key=KEY, timeout=30, max_retries=0) as sdk:
        stream = sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=4, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_an_expert_source_failure_mid_request_is_reported_and_the_server_keeps_serving(store16):
    with running_server(store16, source=FlakySource) as server:
        try:
            FlakySource.failing = True
            whole = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60)
            error = assert_openai_error(whole, 503)
            assert error["type"] == "expert_source_error" and "10.0.0.9:50051" in error["message"]
            with openai.OpenAI(base_url=server.v1, api_key="unused", timeout=60, max_retries=0) as sdk:
                with pytest.raises(openai.APIError, match="10.0.0.9:50051"):
                    for _ in sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                                         max_tokens=3, stream=True):
                        pass
            assert metric(server.url, "moe_edge_requests_total", outcome="error") == 2
        finally:
            FlakySource.failing = False
        assert_still_serves(server.url)
