"""The optional bearer key: with one set, requests to /v1/... and /metrics must carry
`Authorization: Bearer KEY` or get a 401 before anything else is read (the body is not even
parsed). /health stays open for load balancers and supervisors. The key is compared in constant
time. There is no TLS here: on a LAN, put a TLS proxy in front, or the key travels in clear."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

from common.errors import ConfigError

from .api_errors import error_response


def read_api_key(path: str | Path) -> str:
    """The key in a file (surrounding whitespace ignored)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--api-key-file {path}: not UTF-8 text") from None
    if not key:
        raise ConfigError(f"--api-key-file {path}: the file is empty")
    if any(ch.isspace() for ch in key):
        raise ConfigError(f"--api-key-file {path}: the key must be one word (no spaces or line breaks)")
    return key


class ApiKeyMiddleware:
    """ASGI middleware: refuses protected paths without the right bearer key."""

    def __init__(self, app, *, api_key: str, protected: tuple[str, ...], on_refused: Callable[[str], None]) -> None:
        self.app = app
        self._key = api_key.encode()
        self.protected = protected
        self.on_refused = on_refused  # called with the path of each refused request

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._key)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected) and not self._authorized(scope["headers"]):
            self.on_refused(scope["path"])
            response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                      type="invalid_request_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
