"""The shared-token check: every call but the health check must carry
`authorization: Bearer TOKEN` in its metadata, or it is answered UNAUTHENTICATED.

The token is compared in constant time (hmac.compare_digest). The grpc.health.v1 service is
left open, so a supervisor can probe a host without its secret: it tells nothing of the store."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import grpc

from common.rpc.wire_limits import AUTHORIZATION_KEY

log = logging.getLogger(__name__)
HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def _refusal(reason: str) -> grpc.RpcMethodHandler:
    async def refuse(request, context: grpc.aio.ServicerContext):
        log.warning("refused a call from %s: %s", context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # A unary handler answers any method: the call is refused before its request is read.
    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=lambda raw: None)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(HEALTH_SERVICE_PREFIX):
            return await continuation(details)
        given = [value for key, value in (details.invocation_metadata or ()) if key == AUTHORIZATION_KEY]
        if not given:
            return _refusal(f"{details.method}: no token; send `{AUTHORIZATION_KEY}: Bearer TOKEN` (the coordinator's --token-file)")
        value = given[0].encode() if isinstance(given[0], str) else given[0]
        if not hmac.compare_digest(value, self._expected):
            return _refusal(f"{details.method}: wrong token")
        return await continuation(details)
