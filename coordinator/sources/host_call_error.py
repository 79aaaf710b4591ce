"""HostCallError: a call to one expert host failed, with the gRPC status that says how (what
failover and the restart wait decide on). Its own file so that host_client.py and run_stream.py
both raise it."""

from __future__ import annotations

import grpc

from common.errors import HostError


class HostCallError(HostError):
    """A call to a host failed; `code` is the gRPC status (None: the host answered wrongly)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, *, certificate_refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.certificate_refused = certificate_refused  # a TLS handshake failed over a certificate

    @property
    def may_come_back(self) -> bool:
        """Unreachable or still loading: a host that restarts answers again soon."""
        return self.code == grpc.StatusCode.UNAVAILABLE and not self.certificate_refused

    @property
    def is_setup_mistake(self) -> bool:
        """A wrong token or certificate: retrying elsewhere or later will not mend it."""
        return self.certificate_refused or self.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
