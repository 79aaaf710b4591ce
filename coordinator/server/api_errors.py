"""Every error the server answers, in the OpenAI format:
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status that says whose fault it is.

    invalid JSON, a field out of range, a prompt too long  -> 400 invalid_request_error
    missing or wrong API key (see api_key.py)               -> 401 invalid_request_error
    unknown path / method                                   -> 404 / 405 invalid_request_error
    a body over --max-request-bytes (see body_limit.py)     -> 413 invalid_request_error
    the queue at its bound                                  -> 429 rate_limit_error
    an expert host or source that failed                    -> 503 expert_source_error
    anything else                                           -> 500 server_error (logged)"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from common.errors import ConfigError, HostError, MoeEdgeError, QueueFullError

from .openai_format import error_body

log = logging.getLogger("moe_edge.server")

def outcome_of(status: int) -> str:
    """The `outcome` label of moe_edge_requests_total for a refused or failed request."""
    if status in (401, 429):
        return {401: "unauthorized", 429: "queue_full"}[status]
    return "invalid_request" if status < 500 else "error"


def error_response(status: int, message: str, *, type: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, param=param, code=code), status_code=status, headers=headers)


def describe_error(err: BaseException, *, log_unexpected: bool = True) -> tuple[int, dict]:
    """(HTTP status, error body) for an error raised while serving a request. Errors that are
    not ours are bugs: logged with their traceback."""
    if isinstance(err, QueueFullError):
        return 429, error_body(str(err), type="rate_limit_error", code="queue_full")
    if isinstance(err, ConfigError):
        return 400, error_body(str(err), type="invalid_request_error")
    if isinstance(err, HostError):
        return 503, error_body(f"the expert source failed: {err}", type="expert_source_error")
    if isinstance(err, MoeEdgeError):
        return 500, error_body(str(err), type="server_error")
    if log_unexpected:
        log.error("unexpected error while serving a request", exc_info=err)
    return 500, error_body(f"internal error ({type(err).__name__}); see the server's log", type="server_error")


def _validation_error(err: RequestValidationError) -> dict:
    """The first problem pydantic found, as an OpenAI error body naming the field."""
    first = err.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return error_body(f"the request body is not valid JSON: {detail}", type="invalid_request_error", code="invalid_json")
    if not where:
        return error_body(f"the request body is not a JSON object of the expected shape: {first.get('msg')}",
                          type="invalid_request_error")
    field = ".".join(where)
    if first.get("type") == "missing":
        message = f"{field}: required"
    else:
        message = f"{field}: {first.get('msg', 'invalid value').removeprefix('Value error, ')} (got {first.get('input')!r})"
    return error_body(message, type="invalid_request_error", param=where[0], code="invalid_value")


def install_error_handlers(app: FastAPI, *, count_request, endpoints: tuple[str, ...]) -> None:
    """count_request(endpoint, outcome) counts refusals of our API endpoints."""

    def answer(request: Request, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        if request.url.path in endpoints:
            count_request(request.url.path, outcome_of(status))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return answer(request, 400, _validation_error(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return answer(request, err.status_code, error_body(message, type="invalid_request_error"),
                      headers=getattr(err, "headers", None))

    @app.exception_handler(MoeEdgeError)
    async def our_error(request: Request, err: MoeEdgeError) -> JSONResponse:
        status, body = describe_error(err)
        return answer(request, status, body)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, and uvicorn logs the traceback
        status, body = describe_error(err, log_unexpected=False)
        return answer(request, status, body)
