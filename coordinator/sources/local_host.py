"""Single-machine mode: an expert host process beside the coordinator (`--local-host`).

It listens on a Unix socket in a private temporary folder (mode 0700: only this user can
connect, so it needs no token or TLS), is waited for through its grpc.health.v1 check, and is
stopped (SIGTERM, then SIGKILL after a grace period) when the engine closes, at interpreter
exit, or by itself when this process dies (`--parent-pid`): it is never left behind."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import HostError
from common.host_address import HostAddress
from common.python_module import module_command
from common.rpc.wire_limits import channel_options

log = logging.getLogger(__name__)


class LocalHost:
    """`LocalHost(store)` picks the address; `start()` starts the process and waits until it serves."""

    def __init__(self, store: str | Path, *, mmap: bool = False) -> None:
        self.store = Path(store)
        self.mmap = mmap
        self._folder = Path(tempfile.mkdtemp(prefix="moe-edge-host-"))
        self.address = HostAddress(unix_path=str(self._folder / "expert-host.sock"))
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    def start(self, *, startup_timeout_s: float = 600.0) -> None:
        """Start `python -m expert_host serve` on the whole store; return once it is healthy."""
        command, env = module_command(
            "expert_host", "serve", "--store", self.store, "--listen", self.address,
            "--parent-pid", os.getpid(), "--log-level", "warning", *(["--mmap"] if self.mmap else []),
        )
        # Its own session: a Ctrl-C in the terminal reaches the coordinator, which stops it in order.
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_until_serving(startup_timeout_s)
        log.info("local expert host (pid %d) serving on %s", self.process.pid, self.address)

    def _wait_until_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address.grpc_target, options=channel_options()) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while True:
                code = self.process.poll()
                if code is not None:
                    raise HostError(f"the local expert host exited with code {code} before serving (its error is above)")
                if time.monotonic() > deadline:
                    raise HostError(f"the local expert host did not become healthy within {timeout_s:g} s")
                try:
                    reply = check(health_pb2.HealthCheckRequest(), timeout=0.5, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet (still loading the store)
                time.sleep(0.05)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the host (SIGTERM; SIGKILL if it lingers) and remove its folder. Idempotent."""
        atexit.unregister(self.stop)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)
