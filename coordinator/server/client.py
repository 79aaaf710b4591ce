"""A small client of `python -m coordinator serve` (or any OpenAI-compatible server) for programs
that do not want the OpenAI SDK. Built on httpx; knows nothing about the engine.

    from coordinator.server.client import Client

    client = Client("http://127.0.0.1:8000", api_key=None)
    async for piece in client.stream("Once upon a time", max_tokens=64):
        print(piece, end="", flush=True)
    async for piece in client.chat_stream([{"role": "user", "content": "Hello"}]):
        ...
    reply = client.complete("Once upon a time", max_tokens=64, temperature=0)  # sync
    print(reply.text, reply.finish_reason, reply.completion_tokens)

Sampling arguments left as None are not sent (the server's defaults apply: temperature 1;
temperature 0 is greedy). Errors: ServerError when the server cannot be reached or answers an
error (its message is the server's), QueueFullError (a ServerError) when its queue is full."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from common.errors import QueueFullError, ServerError

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Client:
    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, timeout_s: float = 600.0) -> None:
        """url: the server's base address, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine too)."""
        self.url = url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    # --- streaming (async) ------------------------------------------------------------------

    async def stream(self, prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None) -> AsyncIterator[str]:
        """The completion of `prompt`, piece by piece."""
        body = self._body(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        async for chunk in self._events(COMPLETIONS, body):
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                yield chunk["choices"][0]["text"]

    async def chat_stream(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None,
                          top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None) -> AsyncIterator[str]:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}]), piece by piece."""
        body = self._body(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        async for chunk in self._events(CHAT_COMPLETIONS, body):
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                yield chunk["choices"][0]["delta"]["content"]

    # --- whole replies (sync) ---------------------------------------------------------------

    def complete(self, prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None) -> Completion:
        body = self._body(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        reply = self._post(COMPLETIONS, body)
        return self._completion(reply, reply["choices"][0]["text"])

    def chat(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None) -> Completion:
        body = self._body(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        reply = self._post(CHAT_COMPLETIONS, body)
        return self._completion(reply, reply["choices"][0]["message"]["content"] or "")

    # --- plumbing ---------------------------------------------------------------------------

    def _body(self, **fields) -> dict:
        body = {name: value for name, value in fields.items() if value is not None}
        if self.model is not None:
            body["model"] = self.model
        return body

    @staticmethod
    def _completion(reply: dict, text: str) -> Completion:
        usage = reply.get("usage") or {}
        return Completion(text=text, finish_reason=reply["choices"][0].get("finish_reason") or "",
                          prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))

    def _refusal(self, path: str, status: int, content: bytes) -> ServerError:
        try:
            message = json.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = content.decode("utf-8", "replace")[:200] or "(empty answer)"
        error = QueueFullError if status == 429 else ServerError
        return error(f"{self.url}{path}: HTTP {status}: {message}", status=status)

    def _unreachable(self, path: str, err: httpx.HTTPError) -> ServerError:
        if isinstance(err, httpx.TimeoutException):
            return ServerError(f"{self.url}{path}: no answer in time ({type(err).__name__})")
        return ServerError(f"cannot reach {self.url}{path}: {err or type(err).__name__}")

    def _post(self, path: str, body: dict) -> dict:
        try:
            with httpx.Client(timeout=self.timeout, headers=self.headers) as http:
                response = http.post(self.url + path, json=body)
        except httpx.HTTPError as err:
            raise self._unreachable(path, err) from None
        if response.status_code >= 400:
            raise self._refusal(path, response.status_code, response.content)
        return response.json()

    async def _events(self, path: str, body: dict) -> AsyncIterator[dict]:
        """The JSON chunks of a server-sent event stream, until [DONE]."""
        body = {**body, "stream": True}
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as http:
                async with http.stream("POST", self.url + path, json=body) as response:
                    if response.status_code >= 400:
                        raise self._refusal(path, response.status_code, await response.aread())
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[len("data:"):].strip()
                        if data == "[DONE]":
                            return
                        try:
                            chunk = json.loads(data)
                        except ValueError:
                            raise ServerError(f"{self.url}{path}: not a JSON event: {data[:200]!r}") from None
                        if "error" in chunk:
                            message = (chunk["error"] or {}).get("message", "an error during the stream")
                            raise ServerError(f"{self.url}{path}: {message}")
                        yield chunk
        except httpx.HTTPError as err:
            raise self._unreachable(path, err) from None
        raise ServerError(f"{self.url}{path}: the stream ended without [DONE]")
