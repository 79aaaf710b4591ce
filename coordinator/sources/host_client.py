"""One expert host as the coordinator sees it: a grpc.aio channel, its grpc.health.v1 check,
Info, FetchExpert streamed straight into a caller's buffer with its checksum verified, and
RunExperts (a layer's experts run there: hidden states out, their weighted sum back).

RunExperts requests go on one long-lived RunExpertsStream (run_stream.py) unless `stream_runs`
is off: opened at the first run call, kept while it works (a stream costs nothing idle, and
keeping it spares the next generation's first layer the set-up), torn down by any failure of a
call on it (the host died, stopped, missed the deadline or answered wrongly) and opened again
at the next call, which the pool makes only to a host it has marked up again (or as the last
try of a host marked down). A host that does not know the stream (UNIMPLEMENTED: an older
moe-edge) gets unary RunExperts calls from then on. The runs have a channel of their own; one
still waiting out a failed connection's backoff when the main channel is connected again is
replaced by a fresh one (the host is back; the old one would fail the next run).

Knows nothing of replicas or failover (expert_pool.py does that): every failure becomes one
HostError that names the host, what we were doing and, where it helps, what to check. Made
and used on the fetch loop only (a grpc.aio channel belongs to the event loop it was made on),
except `send_run_blocking` / `receive_run_blocking`: a RunExperts request from the thread that
waits for it, on a synchronous channel and stream of their own (blocking_run_stream.py)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.credential_files import read_pem, read_token
from common.errors import ConfigError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.rpc.chunk_codec import FETCH_EXPERT_METHOD, decode_chunk
from common.rpc.wire_limits import AUTHORIZATION_KEY, channel_options
from common.store.checksum import StreamingChecksum

from .cluster_config import ClusterConfig
from .blocking_run_stream import BlockingRunStream, RequestGivenUp
from .host_call_error import HostCallError
from .run_stream import RunStream
from .tls_check import diagnose_tls

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertHost"].full_name


RUN_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}  # a streamed reply's error_code -> its status


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's row-major bytes (bfloat16 included, which numpy lacks)."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True)
class HostInfo:
    format_version: int
    model_id: str
    experts: frozenset[ExpertId]
    blob_nbytes: int
    ram_bytes: int
    memory_gbps: float
    host_name: str
    version: str
    can_run_experts: bool = False
    expert_ms: float = 0.0  # one expert at batch 1 on the host's CPU, measured at its start
    run_experts_calls: int = 0  # RunExperts calls it answered since its start


@dataclass(frozen=True)
class ClientCredentials:
    """The token and TLS material, read once from their files (whose paths errors name)."""

    token: str | None = None
    root_ca: bytes | None = None  # None: plaintext
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_config(cls, cluster: ClusterConfig) -> "ClientCredentials":
        tls = cluster.tls
        credentials = cls(
            token=read_token(cluster.token_file) if cluster.token_file else None,
            root_ca=read_pem(tls.ca, what="TLS CA") if tls else None,
            cert_chain=read_pem(tls.cert, what="TLS client certificate") if tls and tls.cert else None,
            private_key=read_pem(tls.key, what="TLS client key") if tls and tls.key else None,
            ca_file=tls.ca if tls else None,
            cert_file=tls.cert if tls else None,
            key_file=tls.key if tls else None,
        )
        credentials._check_files()
        return credentials

    def _check_files(self) -> None:
        """Load the CA and the client pair with `ssl`: a wrong file is named now, not as a failed handshake."""
        if self.ca_file is None:
            return
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cadata=self.root_ca.decode("ascii", errors="replace"))
        except ssl.SSLError as err:
            raise ConfigError(f"TLS CA {self.ca_file} (--tls-ca / [tls] ca): no CA certificate OpenSSL can load "
                              f"({err.reason or err})") from None
        if self.cert_file is None:
            return
        try:
            context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")  # never prompt
        except ssl.SSLError as err:
            what = ("is not the key of" if err.reason == "KEY_VALUES_MISMATCH"
                    else f"cannot be loaded ({err.reason or err}) with")
            raise ConfigError(f"TLS client key {self.key_file} (--tls-key) {what} the client certificate "
                              f"{self.cert_file} (--tls-cert)") from None


@dataclass
class BlockingRun:
    """A RunExperts request in flight on a blocking stream: what its reply is checked against."""
    stream: BlockingRunStream
    request_id: int
    doing: str
    shape: torch.Size
    timeout_s: float


class HostClient:
    def __init__(self, address: HostAddress, credentials: ClientCredentials, *, stream_runs: bool = True) -> None:
        self.address = address
        self.stream_runs = stream_runs  # False: unary RunExperts calls (the switch, or a host without the stream)
        self._run_stream: RunStream | None = None
        self._blocking_stream: BlockingRunStream | None = None  # runs from the token loop's thread, on
        self._blocking_channel: grpc.Channel | None = None  # a synchronous channel of their own
        self._blocking_lock = threading.Lock()
        self.run_compute_seconds = 0.0  # summed over answered RunExperts calls: the host's own compute time
        self.credentials = credentials
        self.tls = credentials.root_ca is not None and not address.is_unix  # a Unix socket is local: no TLS
        self._channel = self._open_channel()
        # RunExperts on a connection of its own (its own subchannel pool: gRPC would share one
        # TCP connection between channels to the same host otherwise). On one HTTP/2
        # connection a run's few KB queue behind the expert chunks a fetch has already written
        # to the socket; on two, the network interleaves them as it does any two flows.
        self._open_run_channel()
        self._metadata = ((AUTHORIZATION_KEY, f"Bearer {credentials.token}"),) if credentials.token else ()
        self._info = pb_grpc.ExpertHostStub(self._channel).Info
        self._health = health_pb2_grpc.HealthStub(self._channel).Check
        self._fetch = self._channel.unary_stream(
            FETCH_EXPERT_METHOD, request_serializer=pb.FetchExpertRequest.SerializeToString, response_deserializer=decode_chunk,
        )

    def _open_run_channel(self) -> None:
        self._run_channel = self._open_channel([("grpc.use_local_subchannel_pool", 1)])
        self._run_experts = pb_grpc.ExpertHostStub(self._run_channel).RunExperts
        self._open_run_stream = pb_grpc.ExpertHostStub(self._run_channel).RunExpertsStream

    async def _renew_run_channel_if_stuck(self) -> None:
        """A channel whose connection failed waits out gRPC's reconnect backoff (up to
        MAX_RECONNECT_BACKOFF_MS) and fails every call meanwhile with the old error. Where the
        run channel waits so while the main channel is connected (the host is back: it answered
        there, which is how the pool marked it up), a fresh run channel connects now instead."""
        if (self._run_channel.get_state() != grpc.ChannelConnectivity.TRANSIENT_FAILURE
                or self._channel.get_state() != grpc.ChannelConnectivity.READY):
            return
        stale = self._run_channel
        await self._end_run_stream(HostCallError(f"{self}: its run connection is being renewed"))  # it failed with it
        self._open_run_channel()
        await stale.close()

    async def _end_run_stream(self, failure: HostCallError) -> None:
        """Close the run stream, if any, and let go of its call (before its channel closes)."""
        self.close_run_stream(failure)
        if self._run_stream is not None:
            await self._run_stream.ended()
            self._run_stream = None

    def _open_channel(self, extra_options: list | None = None, *, api=grpc.aio):
        """A channel to the host from `api`: grpc.aio (the fetch loop's), or grpc (synchronous)."""
        options = channel_options() + (extra_options or [])
        if not self.tls:
            return api.insecure_channel(self.address.grpc_target, options=options)
        credentials = self.credentials
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=credentials.root_ca, private_key=credentials.private_key,
            certificate_chain=credentials.cert_chain,
        )
        return api.secure_channel(self.address.grpc_target, channel_credentials, options=options)

    def __str__(self) -> str:
        return str(self.address)

    async def serving(self, *, timeout_s: float) -> bool:
        """True once its health check says SERVING; False while it loads its shard (NOT_SERVING).
        The health service needs no token."""
        try:
            reply = await self._health(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise self._call_error(err, "checking its health", timeout_s) from None
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def info(self, *, timeout_s: float) -> HostInfo:
        try:
            reply = await self._info(pb.InfoRequest(), timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            error = self._call_error(err, "asking for its Info", timeout_s)
            raise (await self._certificate_error(err, "asking for its Info", timeout_s) or error) from None
        return HostInfo(
            format_version=reply.format_version,
            model_id=reply.model_id,
            experts=frozenset(ExpertId(e.layer, e.expert) for e in reply.experts),
            blob_nbytes=reply.blob_nbytes,
            ram_bytes=reply.ram_bytes,
            memory_gbps=reply.memory_gbps,
            host_name=reply.host_name,
            version=reply.version,
            can_run_experts=reply.can_run_experts,
            expert_ms=reply.expert_ms,
            run_experts_calls=reply.run_experts_calls,
        )

    async def fetch_into(self, eid: ExpertId, out: memoryview, *, checksum: str, model_id: str,
                         timeout_s: float, chunk_bytes: int = 0) -> None:
        """Fill `out` (writable, the blob's size) with the expert's bytes; raise HostCallError
        unless every byte arrived in order and the whole matches `checksum`."""
        request = pb.FetchExpertRequest(
            id=pb.ExpertId(layer=eid.layer, expert=eid.expert), chunk_bytes=chunk_bytes, model_id=model_id,
        )
        call = self._fetch(request, timeout=timeout_s, metadata=self._metadata)
        digest = StreamingChecksum()
        received = 0
        try:
            async for chunk in call:
                if chunk.offset != received:
                    raise HostCallError(f"{self}: sent {eid} out of order (offset {chunk.offset}, expected {received})")
                if received == 0:
                    self._check_first_chunk(eid, chunk.total_bytes, chunk.checksum, len(out), checksum)
                end = received + len(chunk.data)
                if end > len(out):
                    raise HostCallError(f"{self}: sent more than the {len(out)} bytes of {eid}")
                out[received:end] = chunk.data
                digest.update(chunk.data)
                received = end
        except grpc.aio.AioRpcError as err:
            raise self._call_error(err, f"fetching {eid}", timeout_s) from None
        finally:
            call.cancel()  # no-op once the stream is done; stops it after an error of ours
        if received != len(out):
            raise HostCallError(f"{self}: the stream of {eid} ended after {received} of {len(out)} bytes")
        if digest.hexdigest() != checksum:
            raise HostCallError(
                f"{self}: {eid} arrived corrupted (checksum {digest.hexdigest()}, the manifest says {checksum})"
            )

    async def run_experts(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor, *,
                          timeout_s: float, model_id: str = "") -> torch.Tensor:
        """The weighted sum of `experts` of `layer` run on the host: hidden [T, H] (a CPU tensor
        in float32, bfloat16 or float16, which the host computes in), weights [T, n] -> [T, H]
        float32. Raises HostCallError naming the host for a failed call or a wrong answer."""
        request = self._run_request(layer, experts, hidden, weights, model_id)
        doing = f"running layer {layer} experts {list(experts)}"
        await self._renew_run_channel_if_stuck()
        if self.stream_runs:
            reply = await self._run_streamed(request, doing, timeout_s)
        else:
            try:
                reply = await self._run_experts(request, timeout=timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                raise self._call_error(err, doing, timeout_s) from None
        try:
            return self._run_output(reply, doing, hidden.shape)
        except HostCallError as err:
            self.close_run_stream(err)
            raise

    @staticmethod
    def _run_request(layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor,
                     model_id: str) -> pb.RunExpertsRequest:
        if hidden.dtype not in RUN_DTYPE_NAMES:
            raise ValueError(f"run_experts: hidden is {hidden.dtype}; send one of {', '.join(RUN_DTYPE_NAMES.values())}")
        tokens, hidden_size = hidden.shape
        return pb.RunExpertsRequest(
            layer=layer, experts=list(experts), dtype=RUN_DTYPE_NAMES[hidden.dtype], shape=[tokens, hidden_size],
            hidden=_tensor_bytes(hidden), weights=_tensor_bytes(weights.float()), model_id=model_id,
        )

    def _run_output(self, reply: pb.RunExpertsReply, doing: str, shape: torch.Size) -> torch.Tensor:
        """A reply's sum [T, H] float32, checked against the request's shape (HostCallError)."""
        tokens, hidden_size = shape
        if list(reply.shape) != [tokens, hidden_size] or len(reply.output) != tokens * hidden_size * 4:
            raise HostCallError(f"{self}: answered {doing} with shape {list(reply.shape)} and {len(reply.output)} bytes; "
                                f"expected float32 [{tokens}, {hidden_size}]")
        self.run_compute_seconds += reply.compute_s  # what the host says it spent computing (the rest: wire, queues)
        # bytearray: torch.frombuffer wants a writable buffer; the copy is one step's activations
        return torch.frombuffer(bytearray(reply.output), dtype=torch.float32).view(tokens, hidden_size)  # [T, H]

    # --- RunExperts from the waiting thread (blocking_run_stream.py) ------------------------

    def send_run_blocking(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor, *,
                          timeout_s: float, model_id: str = "") -> "BlockingRun | None":
        """Start a RunExperts request on this host's blocking stream from any thread (opened
        here, with a synchronous channel of its own, where there is none); finish it with
        `receive_run_blocking` on the same thread. None where the stream is not for this call
        (unary runs, or another thread's request in flight). Raises HostCallError."""
        if not self.stream_runs:
            return None
        request = self._run_request(layer, experts, hidden, weights, model_id)
        stream = self._blocking_stream_now()
        try:
            request_id = stream.send(request, timeout_s)
        except RequestGivenUp:  # this thread's last request was never read: it closed that stream
            stream = self._blocking_stream_now()  # a new one, with nothing in flight
            request_id = stream.send(request, timeout_s)
        if request_id is None:
            return None
        return BlockingRun(stream, request_id, f"running layer {layer} experts {list(experts)}", hidden.shape, timeout_s)

    def receive_run_blocking(self, run: "BlockingRun") -> torch.Tensor:
        """The sum [T, H] float32 of a request `send_run_blocking` started; raises HostCallError
        (and drops the stream and its channel: the next call connects afresh, not behind a
        failed connection's backoff)."""
        try:
            reply = run.stream.receive(run.request_id, run.timeout_s)
        except HostCallError as err:  # the stream is closed
            self._drop_blocking_channel(run.stream)
            raise HostCallError(f"{err} (the request: {run.doing})", err.code,
                                certificate_refused=err.certificate_refused) from None
        self._check_not_refused(reply, run.doing)
        try:
            return self._run_output(reply, run.doing, run.shape)
        except HostCallError as err:
            run.stream.close(err)
            self._drop_blocking_channel(run.stream)
            raise

    def _blocking_stream_now(self) -> BlockingRunStream:
        """The open blocking stream, opened (and its channel) where there is none or it closed."""
        with self._blocking_lock:
            if self._blocking_stream is None or self._blocking_stream.closed:
                self._open_blocking_stream()
            return self._blocking_stream

    def _open_blocking_stream(self) -> None:
        if self._blocking_channel is None:
            self._blocking_channel = self._open_channel([("grpc.use_local_subchannel_pool", 1)], api=grpc)
        open_stream = pb_grpc.ExpertHostStub(self._blocking_channel).RunExpertsStream
        self._blocking_stream = BlockingRunStream(
            lambda requests: open_stream(requests, metadata=self._metadata),
            lambda err, timeout_s: self._call_error(err, "running experts on its RunExperts stream", timeout_s), str(self))

    def _drop_blocking_channel(self, stream: BlockingRunStream) -> None:
        with self._blocking_lock:
            if self._blocking_stream is not stream:
                return  # a newer stream took its place
            channel, self._blocking_channel, self._blocking_stream = self._blocking_channel, None, None
        if channel is not None:
            channel.close()

    def close_blocking(self, failure: HostCallError) -> None:
        """Close the blocking stream and its channel (any thread; the client's close does it)."""
        stream = self._blocking_stream  # a channel is only ever open with its stream
        if stream is not None:
            stream.close(failure)
            self._drop_blocking_channel(stream)

    @property
    def blocking_run_stream_open(self) -> bool:
        """Whether a blocking RunExpertsStream (send_run_blocking) to this host is open now."""
        stream = self._blocking_stream
        return stream is not None and not stream.closed

    @property
    def run_stream_open(self) -> bool:
        """Whether a RunExpertsStream to this host is open now."""
        return self._run_stream is not None and not self._run_stream.closed

    async def _run_streamed(self, request: pb.RunExpertsRequest, doing: str, timeout_s: float) -> pb.RunExpertsReply:
        """`request` on the open stream (opened first if there is none); its reply, or HostCallError."""
        if not self.run_stream_open:
            self._run_stream = RunStream(self._open_run_stream(metadata=self._metadata),  # no deadline: each request has its own
                                         lambda err: self._call_error(err, "running experts on its RunExperts stream", timeout_s),
                                         str(self))
        stream = self._run_stream
        try:
            reply = await asyncio.wait_for(stream.exchange(request), timeout_s)
        except asyncio.TimeoutError:
            error = HostCallError(f"{self}: no answer within {timeout_s:g} s while {doing}", grpc.StatusCode.DEADLINE_EXCEEDED)
            stream.close(error)
            raise error from None
        except HostCallError as err:  # the stream ended, for every request on it
            if err.code != grpc.StatusCode.UNIMPLEMENTED:
                raise HostCallError(f"{err} (the request: {doing})", err.code,
                                    certificate_refused=err.certificate_refused) from None
            self.stream_runs = False  # an older host: it answers unary calls
            try:
                return await self._run_experts(request, timeout=timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as unary_err:
                raise self._call_error(unary_err, doing, timeout_s) from None
        self._check_not_refused(reply, doing)
        return reply

    def _check_not_refused(self, reply: pb.RunExpertsReply, doing: str) -> None:
        """A streamed reply that says the host refused its request raises its status as
        HostCallError (the stream goes on)."""
        if reply.error_code:
            code = _STATUS_CODES.get(reply.error_code, grpc.StatusCode.UNKNOWN)
            raise HostCallError(f"{self}: {code.name} while {doing}: {reply.error_message}", code)

    def close_run_stream(self, failure: HostCallError) -> None:
        if self._run_stream is not None:
            self._run_stream.close(failure)

    def _check_first_chunk(self, eid: ExpertId, total_bytes: int, host_checksum: str, size: int, checksum: str) -> None:
        if total_bytes != size:
            raise HostCallError(f"{self}: {eid} is {total_bytes} bytes there and {size} here: does it serve another store?")
        if host_checksum != checksum:
            raise HostCallError(
                f"{self}: {eid} has checksum {host_checksum} there and {checksum} in our manifest: does it serve another store?"
            )

    def _call_error(self, err: grpc.aio.AioRpcError, doing: str, timeout_s: float) -> HostCallError:
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"{self}: no answer within {timeout_s:g} s while {doing}"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            message = f"{self}: refused our token while {doing} ({details}); check the token file (--token-file / token_file)"
        elif code == grpc.StatusCode.UNAVAILABLE and "still loading its shard" in details:
            message = f"{self}: still loading its shard while {doing}"
        elif code == grpc.StatusCode.UNAVAILABLE and "host is stopping" in details:
            message = f"{self}: stopping (a graceful stop) while {doing}"
        elif code == grpc.StatusCode.UNAVAILABLE:
            if self.tls:
                hint = ("is it up, does it serve TLS, and is its certificate signed by our CA (--tls-ca) "
                        "and made out to this address?")
            elif self.address.is_unix:
                hint = "is it up?"
            elif "Socket closed" in details:  # what a TLS server does to a plaintext client
                hint = "it closed the connection at once, as a host that serves TLS does: give its CA (--tls-ca, or [tls] ca in cluster.toml)"
            else:
                hint = "is it up and listening there? If it serves TLS, give its CA (--tls-ca, or [tls] ca in cluster.toml)"
            message = f"{self}: unreachable while {doing} ({details}); {hint}"
        else:
            message = f"{self}: {code.name} while {doing}: {details}"
        return HostCallError(message, code)

    async def _certificate_error(self, err: grpc.aio.AioRpcError, doing: str, timeout_s: float) -> HostCallError | None:
        """gRPC's details for a failed handshake are generic: where TLS is on and they look like
        one, repeat the handshake with `ssl` (on a worker thread) to say which side refused."""
        details = err.details() or ""
        if not self.tls or self.credentials.ca_file is None or err.code() != grpc.StatusCode.UNAVAILABLE or not any(
            sign in details for sign in ("Socket closed", "andshake", "SSL", "reset")
        ):
            return None
        credentials = self.credentials
        reason = await asyncio.to_thread(
            diagnose_tls, self.address.host, self.address.port, ca=credentials.ca_file, cert=credentials.cert_file,
            key=credentials.key_file, timeout_s=timeout_s,
        )
        return HostCallError(f"{self}: {reason} (while {doing})", err.code(), certificate_refused=True) if reason else None

    async def close(self) -> None:
        self.close_blocking(HostCallError(f"{self}: the client is closing", grpc.StatusCode.CANCELLED))
        await self._end_run_stream(HostCallError(f"{self}: the client is closing", grpc.StatusCode.CANCELLED))
        await self._run_channel.close()
        await self._channel.close()
