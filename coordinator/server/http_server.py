"""Running the app with uvicorn: in the foreground (the `serve` command) or in a thread of this
process (tests, notebooks). We bind the socket ourselves, so port 0 works and the URL we print
is the one that answers."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from common.errors import ConfigError

GRACEFUL_SHUTDOWN_S = 5


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--listen {host}:{port}: cannot listen there ({err.strerror})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app, *, log_level: str, access_log: bool) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="off",
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


class _Terminated(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _terminated(signum, frame) -> None:
    raise _Terminated


def run_server(app, *, host: str, port: int, on_listening: Callable[[str], None] | None = None,
               log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM, then return once uvicorn has stopped gracefully (open
    streams get GRACEFUL_SHUTDOWN_S seconds). on_listening(url) once the socket is bound:
    connections made from then on wait in its backlog until uvicorn accepts them."""
    sock = bind_socket(host, port)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        if on_listening is not None:
            on_listening(url_of(sock))
        uvicorn.Server(_config(app, log_level=log_level, access_log=True)).run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass  # uvicorn re-raises the signal it stopped on; stopping was the point
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        sock.close()


class BackgroundServer:
    """The app served from a thread of this process, on 127.0.0.1 and a free port by default.

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self._sock = bind_socket(host, port)
        self.url = url_of(self._sock)
        self._server = uvicorn.Server(_config(app, log_level=log_level, access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="moe-edge-http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server at {self.url} did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
