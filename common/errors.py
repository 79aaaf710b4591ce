"""One small hierarchy of errors. The CLI turns them into one line and an exit code; servers
turn them into gRPC status codes. Every message names the thing at fault (file, expert, host,
setting) so the user can act on it without a traceback."""


class MoeEdgeError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class ConfigError(MoeEdgeError):
    """A setting or model configuration we cannot work with."""

    exit_code = 2


class StoreError(MoeEdgeError):
    """A packed store (or checkpoint folder) that is missing, corrupt or of another format."""

    exit_code = 3


class HostError(MoeEdgeError):
    """An expert host that is unknown, unreachable, slow, or answered wrongly."""

    exit_code = 4


class ExpertUnavailableError(HostError):
    """No source could deliver an expert: every host that holds it failed."""


class ServerError(MoeEdgeError):
    """Our HTTP server could not be reached, or answered a request with an error. `status` is the
    HTTP status when there was an answer."""

    exit_code = 5

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class QueueFullError(ServerError):
    """The server's waiting queue is at its bound (HTTP 429): retry later."""
