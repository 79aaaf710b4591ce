"""The bound on a request's body (`--max-request-bytes`), and the memory a large one leaves.

A body whose Content-Length is over the bound gets 413 at once, before a byte of it is read
(a client that sent `Expect: 100-continue`, as curl does for big uploads, never sends it). A
body without Content-Length (chunked) is counted as it arrives, and gets 413 as soon as it
passes the bound: it is never held whole. The reply is in the OpenAI error format, like every
other error of the server (code "request_too_large").

glibc keeps the memory of freed allocations in the process; after a request with a large body
(LARGE_BODY_BYTES or more: its bytes, its JSON, its text and tokens were several copies of it)
the free memory is handed back to the kernel, in a worker thread, so that the server's resident
size comes back near where it was instead of staying at its peak.

Knows nothing about the routes: ASGI in, ASGI out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from common.malloc_tuning import give_freed_memory_back

from .api_errors import error_response

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
LARGE_BODY_BYTES = 1 << 20


class _BodyTooLarge(Exception):
    """Raised into the app by receive(); the middleware answers 413 in its place."""


def too_large_response(limit: int):
    return error_response(413, f"the request body is larger than this server takes ({limit} bytes, "
                          "its --max-request-bytes); send a shorter prompt",
                          type="invalid_request_error", code="request_too_large")


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses such a request before we see it
    return None


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a body over max_bytes; frees memory after a large one.
    on_refused(path) is called for each request refused here."""

    def __init__(self, app, *, max_bytes: int, on_refused: Callable[[str], None],
                 large_body_bytes: int = LARGE_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused
        self.large_body_bytes = large_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope["headers"])
        if length is not None and length > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        too_large = False
        replied = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            nonlocal replied
            if too_large:
                # the app answers its own error for the body it could not read (FastAPI: 400);
                # the 413 goes out in its place
                if message["type"] == "http.response.start" and not replied:
                    replied = True  # counted by the app's error handler already
                    await too_large_response(self.max_bytes)(scope, receive, send)
                return
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not replied:
                replied = True
                await self._refuse(scope, receive, send)
        finally:
            if received >= self.large_body_bytes:
                await asyncio.to_thread(give_freed_memory_back)

    async def _refuse(self, scope, receive, send) -> None:
        self.on_refused(scope["path"])
        await too_large_response(self.max_bytes)(scope, receive, send)
