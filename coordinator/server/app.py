"""The routes of the OpenAI-compatible server, wired to one engine.

    POST /v1/completions        prompt -> text (stream: true for server-sent events)
    POST /v1/chat/completions   messages -> the assistant's reply (chat_template.py builds the prompt)
    GET  /v1/models             the one model this server runs
    GET  /health                liveness, queue and whether a request is generating (never needs the key)
    GET  /metrics               Prometheus text format (metrics.py)

A body over max_request_bytes gets 413 before it is read whole (body_limit.py). Each handler
parses (schemas.py), starts a Job (jobs.py: queued, tokenized off the event loop by
prompt_tokens.py, and validated before any reply starts) and hands it to streaming.py. The
`model` field of a request is not checked: a server runs one model, and replies name it."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from common.errors import ConfigError

from .api_errors import describe_error, error_response, install_error_handlers
from .api_key import ApiKeyMiddleware
from .body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware
from .jobs import Jobs
from .metrics import ServerMetrics
from .openai_format import ChatFormat, CompletionFormat, usage
from .prompt_tokens import PromptTokenizer
from .scheduler import GenerationQueue
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from .streaming import EventStreamResponse, collect_text, stream_events

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
PROTECTED = ("/v1/", "/metrics")


def build_app(engine, *, model_name: str, api_key: str | None = None, max_queue: int = 16,
              default_max_tokens: int = 256, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The ASGI app. max_queue: requests that may wait while one generates (more get 429);
    default_max_tokens: the budget of a request that names none (capped by the context);
    max_request_bytes: the largest request body taken (more get 413)."""
    if max_request_bytes < 1:
        raise ConfigError(f"--max-request-bytes {max_request_bytes}: must be at least 1")
    queue = GenerationQueue(max_queue)
    metrics = ServerMetrics(engine, model_name=model_name, queue_length=lambda: queue.waiting,
                            generating=lambda: queue.generating)
    jobs = Jobs(engine, queue, metrics, default_max_tokens=default_max_tokens)
    prompts = PromptTokenizer(engine.tokenizer, context=engine.config.max_position_embeddings)
    started = int(time.time())

    app = FastAPI(title="moe-edge", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app, count_request=metrics.count_request, endpoints=(COMPLETIONS, CHAT_COMPLETIONS))

    def too_large(path: str) -> None:
        if path in (COMPLETIONS, CHAT_COMPLETIONS):
            metrics.count_request(path, "invalid_request")

    # added before the key's middleware, so it runs inside it: a client without the key gets 401
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes, on_refused=too_large)
    if api_key is not None:
        def refused(path: str) -> None:
            if path in (COMPLETIONS, CHAT_COMPLETIONS):
                metrics.count_request(path, "unauthorized")

        app.add_middleware(ApiKeyMiddleware, api_key=api_key, protected=PROTECTED, on_refused=refused)

    async def respond(request: Request, body: SamplingRequest, job, reply) -> Response:
        if body.stream:
            return EventStreamResponse(stream_events(job, reply, include_usage=body.include_usage()), job)
        try:
            text = await collect_text(job, request)
        except Exception as err:  # the job counted it; answer here so the handlers do not count it again
            status, error = describe_error(err)
            return JSONResponse(error, status_code=status)
        if text is None:  # the client is gone; nobody reads this
            return error_response(499, "the client closed the request", type="invalid_request_error")
        return JSONResponse(reply.whole(text, job.finish_reason, usage(job.prompt_tokens, job.completion_tokens)))

    @app.post(COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt_value()
        job = await jobs.start(prompt if isinstance(prompt, list) else lambda: prompts.text(prompt),
                               endpoint=COMPLETIONS, max_tokens=body.max_tokens, sampling=body.sampling())
        return await respond(request, body, job, CompletionFormat(model_name))

    @app.post(CHAT_COMPLETIONS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [m.plain() for m in body.messages]
        job = await jobs.start(lambda: prompts.chat(messages), endpoint=CHAT_COMPLETIONS,
                               max_tokens=body.token_budget(), sampling=body.sampling())
        return await respond(request, body, job, ChatFormat(model_name))

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "moe-edge"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        if name != model_name:
            return error_response(404, f"model {name!r} is not served here; this server runs {model_name!r}",
                                  type="invalid_request_error", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "model_id": engine.store.manifest.model_id,
                "generating": bool(queue.generating), "queue_length": queue.waiting}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # in a thread: a source's host_status may take a moment
        return Response(await asyncio.to_thread(metrics.exposition), media_type=CONTENT_TYPE_LATEST)

    return app
