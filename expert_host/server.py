"""`serve`: load the shard, then run the gRPC server (ExpertHost + grpc.health.v1) until
SIGTERM/SIGINT (or its parent's exit, with --parent-pid), then stop gracefully.

Binds to localhost unless told otherwise, and refuses a non-loopback address without TLS or a
token unless `insecure` is set."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from common.credential_files import read_pem, read_token
from common.errors import ConfigError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.index_spec import parse_index_spec
from common.malloc_tuning import keep_freed_buffers_for_reuse
from common.rpc.wire_limits import server_options
from common.store.reader import ExpertStore

from .fault_injection import FaultInjection
from .memory_bandwidth import measure_memory_gbps
from .servicer import SERVICE_NAME, ExpertHostServicer, add_to_server
from .shard import ExpertShard
from .token_auth import TokenAuthInterceptor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must show a certificate signed by this CA (mutual TLS)

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key, what="--tls-key"), read_pem(self.cert, what="--tls-cert"))
        client_ca = read_pem(self.client_ca, what="--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def check_listen_allowed(address: HostAddress, *, tls: bool, token: bool, insecure: bool) -> None:
    """A host reachable from other machines must take TLS or a token, unless told --insecure."""
    if address.is_loopback or tls or token or insecure:
        return
    raise ConfigError(
        f"--listen {address}: other machines can reach this address, and the host has neither TLS "
        "(--tls-cert/--tls-key) nor a token (--token-file); give one (see deploy/README.md) or pass --insecure"
    )


def serve_expert_host(
    *,
    store: str | Path,
    layers: str | None = None,
    experts: str | None = None,
    listen: str = "127.0.0.1:50051",
    mmap: bool = False,
    tls: TlsFiles | None = None,
    token_file: str | Path | None = None,
    insecure: bool = False,
    address_file: str | Path | None = None,
    grace_period_s: float = 5.0,
    parent_pid: int | None = None,
    faults: FaultInjection = FaultInjection(),
) -> None:
    address = HostAddress.parse(listen, what="--listen", allow_any_port=True)
    check_listen_allowed(address, tls=tls is not None, token=token_file is not None, insecure=insecure)
    token = read_token(token_file) if token_file is not None else None
    credentials = tls.credentials() if tls is not None else None
    opened = ExpertStore(store)
    model = opened.config
    held = [
        ExpertId(layer, expert)
        for layer in parse_index_spec(layers, model.num_layers, what="layers")
        for expert in parse_index_spec(experts, model.num_experts, what="experts")
    ]
    if faults.active:
        log.warning("test hooks are on: %s", faults)
    keep_freed_buffers_for_reuse()  # a fresh buffer per chunk would otherwise be faulted in page by page
    tls_mode = "off" if tls is None else ("mutual" if tls.client_ca else "on")
    asyncio.run(_serve(lambda: ExpertShard(opened, held, mmap=mmap), address, faults=faults, credentials=credentials,
                       tls_mode=tls_mode, token=token, address_file=address_file, grace_period_s=grace_period_s,
                       parent_pid=parent_pid))


async def _serve(load_shard: Callable[[], ExpertShard], address: HostAddress, *, faults: FaultInjection,
                 credentials: grpc.ServerCredentials | None, tls_mode: str, token: str | None,
                 address_file: str | Path | None, grace_period_s: float, parent_pid: int | None) -> None:
    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.aio.server(options=server_options(), interceptors=interceptors)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        if credentials is not None:
            port = server.add_secure_port(address.grpc_target, credentials)
        else:
            port = server.add_insecure_port(address.grpc_target)
    except RuntimeError as err:
        raise ConfigError(f"--listen {address}: cannot listen there ({err}); is another host using it?") from None
    bound = address if address.is_unix else address.with_port(port)
    # The address is taken (a clash fails before a long load); the shard loads, then we serve.
    servicer = ExpertHostServicer(await asyncio.to_thread(load_shard), memory_gbps=measure_memory_gbps(), faults=faults)
    add_to_server(servicer, server)
    await server.start()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s of store %s (model_id %s) on %s (TLS %s, token %s)",
        servicer.shard.describe(), servicer.shard.store.folder, servicer.shard.manifest.model_id, bound,
        tls_mode, "on" if token else "off",
    )
    if address_file is not None:
        _write_atomically(Path(address_file), f"{bound}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid is not None else None
    await stop.wait()
    log.info("stopping: finishing calls in flight (grace period %.1f s)", grace_period_s)
    await health.enter_graceful_shutdown()
    await server.stop(grace_period_s)
    if watcher is not None:
        watcher.cancel()
    if address.is_unix:
        Path(address.unix_path).unlink(missing_ok=True)
    if address_file is not None:
        Path(address_file).unlink(missing_ok=True)
    log.info("stopped")


async def _watch_parent(parent: int, stop: asyncio.Event, every_s: float = 0.5) -> None:
    """Stop once `parent`, the process that started us, is gone: we were re-parented (perhaps
    already while loading, so its pid comes from the command line, not from getppid at start)."""
    while os.getppid() == parent:
        await asyncio.sleep(every_s)
    log.info("the parent process %d exited", parent)
    stop.set()


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)
