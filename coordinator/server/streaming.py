"""Handing a Job's text to the client: as server-sent events (stream: true) or as one JSON reply
(stream: false). Either way the Job is closed when the exchange ends, and a client that goes away
closes it at once, which stops the generation after the current token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse

from .api_errors import describe_error
from .jobs import Job
from .openai_format import DONE_EVENT, server_sent_event, usage


class EventStreamResponse(StreamingResponse):
    """Closes its Job however the response ends: finished, client gone (Starlette cancels the
    body when the client disconnects), server stopping, or the body never started."""

    def __init__(self, events: AsyncIterator[str], job: Job) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def stream_events(job: Job, reply, *, include_usage: bool) -> AsyncIterator[str]:
    """reply: a CompletionFormat or ChatFormat. An error after the stream began goes out as one
    `data: {"error": ...}` event (the openai package raises it), then [DONE]."""
    try:
        for chunk in reply.opening():
            yield server_sent_event(chunk)
        async for piece in job.pieces():
            yield server_sent_event(reply.piece(piece))
        yield server_sent_event(reply.closing(job.finish_reason))
        if include_usage:
            yield server_sent_event(reply.usage_chunk(usage(job.prompt_tokens, job.completion_tokens)))
    except Exception as err:
        _, body = describe_error(err)
        yield server_sent_event(body)
    finally:
        job.close()
    yield DONE_EVENT


async def _wait_for_disconnect(request: Request) -> None:
    # the body is read already: the next message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_text(job: Job, request: Request) -> str | None:
    """All of the Job's text, or None if the client went away first."""
    parts: list[str] = []
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await _wait_for_disconnect(request)
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                async for piece in job.pieces():
                    parts.append(piece)
            except Exception as err:  # raised below, outside the task group
                failure = err
            group.cancel_scope.cancel()
    finally:
        job.close()
    if failure is not None:
        raise failure
    return "".join(parts) if job.finish_reason in ("stop", "length") else None
