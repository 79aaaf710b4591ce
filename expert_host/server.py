"""`serve`: take the address, answer grpc.health.v1 (NOT_SERVING) while the shard loads, then
serve ExpertHost (SERVING) until SIGTERM/SIGINT (or its parent's exit, with --parent-pid), then
stop gracefully. A coordinator probing a restarting host thus sees "loading", not "gone".

Binds to localhost unless told otherwise, and refuses a non-loopback address without TLS or a
token unless `insecure` is set. TLS files are checked with Python's `ssl` before binding, so a
wrong file is named instead of surfacing as gRPC's "cannot bind"."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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

from .expert_runner import ExpertRunner
from .fault_injection import FaultInjection
from .memory_bandwidth import measure_memory_gbps
from .servicer import SERVICE_NAME, ExpertHostServicer, add_to_server
from .shard import ExpertShard, close_shared_arenas
from .token_auth import TokenAuthInterceptor

log = logging.getLogger(__name__)
T = TypeVar("T")
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8, RSA and EC keys all end their BEGIN line so


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must show a certificate signed by this CA (mutual TLS)

    def credentials(self) -> grpc.ServerCredentials:
        """Check the files (ConfigError naming the wrong one), then gRPC's server credentials."""
        cert, key = read_pem(self.cert, what="--tls-cert"), read_pem(self.key, what="--tls-key")
        client_ca = read_pem(self.client_ca, what="--tls-client-ca") if self.client_ca else None
        self._check(cert, key, client_ca)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def _check(self, cert: bytes, key: bytes, client_ca: bytes | None) -> None:
        if _CERTIFICATE not in cert and _PRIVATE_KEY in cert and _CERTIFICATE in key:
            raise ConfigError(f"--tls-cert {self.cert} holds a private key and --tls-key {self.key} a certificate: "
                              "they are swapped")
        if _CERTIFICATE not in cert:
            raise ConfigError(f"--tls-cert {self.cert}: no certificate in it (expected a {_CERTIFICATE.decode()} block)")
        if _PRIVATE_KEY not in key:
            raise ConfigError(f"--tls-key {self.key}: no private key in it (expected a -----BEGIN PRIVATE KEY----- block)")
        if b"ENCRYPTED" in key:
            raise ConfigError(f"--tls-key {self.key}: the key is encrypted; gRPC needs it unencrypted "
                              "(`openssl pkey -in KEY -out KEY.plain`)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")  # never prompt on the terminal
        except ssl.SSLError as err:
            if err.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError(f"--tls-key {self.key} is not the key of --tls-cert {self.cert} (it belongs to another "
                                  "certificate): give the key that was made with that certificate") from None
            raise ConfigError(f"--tls-cert {self.cert} / --tls-key {self.key}: OpenSSL cannot load them "
                              f"({err.reason or err})") from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
            except ssl.SSLError as err:
                raise ConfigError(f"--tls-client-ca {self.client_ca}: not a CA certificate OpenSSL can load "
                                  f"({err.reason or err})") from None


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
    shared_file: str | Path | None = None,
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
        if ExpertId(layer, expert) in opened.manifest.experts  # dense layers hold no experts
    ]
    if faults.active:
        log.warning("test hooks are on: %s", faults)
    keep_freed_buffers_for_reuse()  # a fresh buffer per chunk would otherwise be faulted in page by page
    tls_mode = "off" if tls is None else ("mutual" if tls.client_ca else "on")

    def load_shard() -> tuple[ExpertShard, float]:
        if faults.load_delay_s:
            time.sleep(faults.load_delay_s)
        shard = ExpertShard(opened, held, mmap=mmap, shared_file=Path(shared_file) if shared_file else None)
        return shard, measure_memory_gbps()

    if shared_file is not None and mmap:
        raise ConfigError("--shared-memory holds the shard in RAM; it does not go with --mmap")
    try:
        asyncio.run(_serve(load_shard, address, faults=faults, credentials=credentials, tls_mode=tls_mode, token=token,
                           address_file=address_file, grace_period_s=grace_period_s, parent_pid=parent_pid))
    finally:  # a coordinator that mapped it may have removed it already; a shard still loading may not make it now
        close_shared_arenas(Path(shared_file) if shared_file is not None else None)


async def _serve(load_shard: Callable[[], tuple[ExpertShard, float]], address: HostAddress, *, faults: FaultInjection,
                 credentials: grpc.ServerCredentials | None, tls_mode: str, token: str | None,
                 address_file: str | Path | None, grace_period_s: float, parent_pid: int | None) -> None:
    # Signals first: a SIGTERM at any moment from here on stops us gracefully, never by default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid is not None else None

    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.aio.server(options=server_options(), interceptors=interceptors)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    servicer = ExpertHostServicer(faults=faults)  # refuses calls (UNAVAILABLE) until its shard is loaded
    add_to_server(servicer, server)
    try:
        if credentials is not None:
            port = server.add_secure_port(address.grpc_target, credentials)
        else:
            port = server.add_insecure_port(address.grpc_target)
    except RuntimeError as err:
        raise ConfigError(f"--listen {address}: cannot listen there ({err}); is another host using it?") from None
    bound = address if address.is_unix else address.with_port(port)
    # The address is taken first: a clash fails before a long load, and a coordinator probing a
    # restarting host hears NOT_SERVING ("loading") instead of a refused connection ("gone").
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    runner = None
    try:
        log.info("listening on %s (TLS %s, token %s); loading the shard", bound, tls_mode, "on" if token else "off")
        loaded = await _unless_stopped(_in_daemon_thread(load_shard), stop)
        if loaded is not None:
            shard, memory_gbps = loaded
            runner = ExpertRunner(shard)
            expert_ms = await runner.measure_expert_ms()  # one expert repacked (a second for a big one) and run
            servicer.serve_shard(shard, runner, memory_gbps=memory_gbps, expert_ms=expert_ms)
            await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving %s of store %s (model_id %s) on %s (TLS %s, token %s)", shard.describe(), shard.store.folder,
                     shard.manifest.model_id, bound, tls_mode, "on" if token else "off")
            if address_file is not None:
                _write_atomically(Path(address_file), f"{bound}\n")
            await stop.wait()
            log.info("stopping: finishing calls in flight (grace period %.1f s)", grace_period_s)
        else:
            log.info("stopping while the shard loads")
    finally:
        await health.enter_graceful_shutdown()
        servicer.end_streams()  # idle RunExpertsStreams would otherwise hold the stop for the whole grace period
        await server.stop(grace_period_s)
        if runner is not None:
            runner.close()
        if watcher is not None:
            watcher.cancel()
        if address.is_unix:
            Path(address.unix_path).unlink(missing_ok=True)
        if address_file is not None:
            Path(address_file).unlink(missing_ok=True)
    log.info("stopped")


async def _set_health(health: HealthServicer, status: int) -> None:
    """The same status for our service and for the whole server (the "" that plain checks ask)."""
    for service in ("", SERVICE_NAME):
        await health.set(service, status)


def _in_daemon_thread(work: Callable[[], T]) -> asyncio.Future:
    """Run `work` on a daemon thread: unlike asyncio.to_thread, a stop while it runs need not
    wait for it (a shard of many GB can take minutes to read)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as err:  # handed to the loop, which re-raises it in _serve
            result, error = None, err
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: we were stopped while loading

    threading.Thread(target=run, name="load-shard", daemon=True).start()
    return future


async def _unless_stopped(work: asyncio.Future, stop: asyncio.Event):
    """`work`'s result, or None once `stop` is set first."""
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    return work.result() if work.done() else None


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
