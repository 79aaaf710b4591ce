"""Single-machine mode: an expert host process beside the coordinator (`--local-host`).

It listens on a Unix socket in a private temporary folder (mode 0700: only this user can
connect, so it needs no token or TLS), is waited for through its grpc.health.v1 check, and is
stopped (SIGTERM, then SIGKILL after a grace period) when the engine closes, at interpreter
exit, or by itself when this process dies (`--parent-pid`): it is never left behind.

Its experts (unless read from disk, `mmap`) live in a file under /dev/shm that the host makes
new with mode 0600 (refusing one that exists, a link included) and this process maps and
removes once the host serves (shared_memory.py); the host removes it when it stops, and so does
`stop` here, for a host that never served. Fetches are
reads of that memory, at in-process speed; only RunExperts and health checks go over the socket.
`source_over` wraps the pool of hosts in that source. Where /dev/shm is missing, experts come
over the socket as from any host."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
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

SHARED_MEMORY_ROOT = Path("/dev/shm")  # memory-backed files (tmpfs) on Linux
SHARED_FILE_PREFIX = "moe-edge-experts-"  # then the coordinator's pid and a random part

log = logging.getLogger(__name__)


class LocalHost:
    """`LocalHost(store)` picks the address; `start()` starts the process and waits until it serves."""

    def __init__(self, store: str | Path, *, mmap: bool = False, shared_memory: bool = True) -> None:
        self.store = Path(store)
        self.mmap = mmap
        self._folder = Path(tempfile.mkdtemp(prefix="moe-edge-host-"))
        self.address = HostAddress(unix_path=str(self._folder / "expert-host.sock"))
        self.shared_file: Path | None = None  # the host's experts, until this process maps them
        if shared_memory and not mmap and _shared_memory_fits(self.store):
            self.shared_file = SHARED_MEMORY_ROOT / f"{SHARED_FILE_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    def start(self, *, startup_timeout_s: float = 600.0) -> None:
        """Start `python -m expert_host serve` on the whole store; return once it is healthy."""
        command, env = module_command(
            "expert_host", "serve", "--store", self.store, "--listen", self.address,
            "--parent-pid", os.getpid(), "--log-level", "warning", *(["--mmap"] if self.mmap else []),
            *(["--shared-memory", self.shared_file] if self.shared_file else []),
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

    def source_over(self, pool_factory, *, pin: bool):
        """A source factory for Engine: the pool that `pool_factory` opens (this host among
        them), its fetches read from this host's shared memory (pinned for CUDA when `pin`)."""
        from .shared_memory import SharedExperts, SharedMemoryHostSource

        if self.shared_file is None:
            return pool_factory

        def open_source(store, fetch_loop):
            pool = pool_factory(store, fetch_loop)
            try:
                shared = SharedExperts.attach(self.shared_file, store, pin=pin)
            except BaseException:
                pool.close()
                raise
            return SharedMemoryHostSource(pool, shared)

        return open_source

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
        if self.shared_file is not None:  # gone already once mapped, or removed by the host as it stopped
            self.shared_file.unlink(missing_ok=True)


def _shared_memory_fits(store: Path) -> bool:
    """Whether /dev/shm has room for the store's experts (a container's is often 64 MB)."""
    from common.store.manifest import Manifest

    if not SHARED_MEMORY_ROOT.is_dir():
        return False
    manifest = Manifest.read(store)
    need = manifest.layout.nbytes * len(manifest.experts)
    stat = os.statvfs(SHARED_MEMORY_ROOT)
    free = stat.f_bavail * stat.f_frsize
    if free < need + (64 << 20):
        log.warning("%s has %.2f GB free and the store's experts need %.2f GB: the local host serves them over its "
                    "socket instead of shared memory (slower; a larger /dev/shm, e.g. docker --shm-size, avoids it)",
                    SHARED_MEMORY_ROOT, free / 1e9, need / 1e9)
        return False
    return True
