"""The ExpertHost service: one `async def` per RPC, each translating proto <-> the shard (fetches)
or the expert runner (RunExperts, expert_runner.py).

FetchExpert's chunks go through common/rpc/chunk_codec.py instead of the generated ExpertChunk
class (same wire bytes, fewer copies), so `add_to_server` registers the handlers itself
rather than through the generated add_ExpertHostServicer_to_server.

RunExpertsStream serves the same requests as RunExperts on one long-lived stream: each request
is checked and run as a unary call is (request_checks.py, then the runner's bounded pool, whose
limits count a stream's requests one by one), concurrently, its reply written when it is done
with the request's request_id. A refused request gets an error reply (status code and message)
and the stream goes on. `end_streams` (the host's graceful stop) ends every open stream once its
requests in flight are answered, with UNAVAILABLE, so an idle stream does not hold the stop for
the whole grace period; streams opened after it are refused the same way.

The servicer is registered before its shard is loaded (the host takes its address and answers
health first); until `serve_shard` is called every RPC is refused with UNAVAILABLE, the code a
coordinator already treats as "not there yet"."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from common.errors import StoreError
from common.rpc import expert_host_pb2 as pb
from common.rpc.chunk_codec import Chunk, encode_chunk
from common.store.manifest import FORMAT_VERSION

from .fault_injection import FaultInjection
from .expert_runner import ExpertRunner
from .request_checks import RequestRefused, plan_fetch, plan_run_experts
from .shard import ExpertShard

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertHost"].full_name


def _version() -> str:
    try:
        return metadata.version("moe-edge")
    except metadata.PackageNotFoundError:
        return "unknown"


LOADING_MESSAGE = "this host is still loading its shard (its grpc.health.v1 check says NOT_SERVING until it is ready)"
STOPPING_MESSAGE = "this host is stopping"


class ExpertHostServicer:
    def __init__(self, *, faults: FaultInjection = FaultInjection()) -> None:
        self.shard: ExpertShard | None = None  # None while loading
        self.runner: ExpertRunner | None = None
        self.memory_gbps = 0.0
        self.expert_ms = 0.0
        self.faults = faults
        self._stopping = asyncio.Event()  # set by end_streams: open streams end, new ones are refused

    def serve_shard(self, shard: ExpertShard, runner: ExpertRunner, *, memory_gbps: float, expert_ms: float) -> None:
        """The shard is loaded and its runner measured: answer calls from now on."""
        self.memory_gbps = memory_gbps
        self.expert_ms = expert_ms
        self.runner = runner
        self.shard = shard

    async def _refuse_while_loading(self, context: grpc.aio.ServicerContext) -> None:
        if self.shard is None:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, LOADING_MESSAGE)  # aborts the call: raises

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        await self._refuse_while_loading(context)
        log.info("Info from %s", context.peer())
        return pb.InfoReply(
            format_version=FORMAT_VERSION,
            model_id=self.shard.manifest.model_id,
            experts=[pb.ExpertId(layer=eid.layer, expert=eid.expert) for eid in self.shard.experts],
            blob_nbytes=self.shard.blob_nbytes,
            ram_bytes=self.shard.ram_bytes,
            memory_gbps=self.memory_gbps,
            can_run_experts=True,
            host_name=socket.gethostname(),
            version=_version(),
            expert_ms=self.expert_ms,
            run_experts_calls=self.runner.calls,
        )

    async def FetchExpert(self, request: pb.FetchExpertRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Chunk]:
        await self._refuse_while_loading(context)
        try:
            plan = plan_fetch(
                self.shard, layer=request.id.layer, expert=request.id.expert, has_id=request.HasField("id"),
                chunk_bytes=request.chunk_bytes, model_id=request.model_id,
            )
            blob = await self.shard.blob(plan.eid)
        except RequestRefused as err:
            await self._refuse(context, err.code, str(err))  # aborts the call: raises
        except StoreError as err:  # a blob read from disk that shrank or fails its checksum
            await self._refuse(context, grpc.StatusCode.DATA_LOSS, str(err))
        log.debug("FetchExpert %s from %s", plan.eid, context.peer())
        if self.faults.fetch_delay_s:
            await asyncio.sleep(self.faults.fetch_delay_s)
        for offset in range(0, len(blob), plan.chunk_bytes):
            data = blob[offset : offset + plan.chunk_bytes]
            if offset == 0:
                if self.faults.corrupt_chunks:
                    data = bytes([data[0] ^ 0xFF]) + bytes(data[1:])
                yield Chunk(0, data, total_bytes=len(blob), checksum=self.shard.checksum_of(plan.eid))
            else:
                yield Chunk(offset, data)

    async def RunExperts(self, request: pb.RunExpertsRequest, context: grpc.aio.ServicerContext) -> pb.RunExpertsReply:
        await self._refuse_while_loading(context)
        try:
            return await self._run(request, context)
        except RequestRefused as err:
            await self._refuse(context, err.code, str(err))  # aborts the call: raises

    async def RunExpertsStream(self, requests: AsyncIterator[pb.RunExpertsRequest], context: grpc.aio.ServicerContext) -> None:
        await self._refuse_while_loading(context)
        if self._stopping.is_set():
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, STOPPING_MESSAGE)
        log.debug("RunExpertsStream opened by %s", context.peer())
        writing = asyncio.Lock()  # one write at a time on a call
        running: set[asyncio.Task] = set()

        async def answer(request: pb.RunExpertsRequest) -> None:
            try:
                reply = await self._run(request, context)
            except RequestRefused as err:
                log.warning("refused a streamed request from %s: %s: %s", context.peer(), err.code.name, err)
                reply = pb.RunExpertsReply(error_code=err.code.value[0], error_message=str(err))
            except Exception as err:  # a bug of ours: that request fails, the host and the stream go on
                log.exception("RunExpertsStream request from %s failed", context.peer())
                reply = pb.RunExpertsReply(error_code=grpc.StatusCode.INTERNAL.value[0],
                                           error_message=f"RunExperts: the host failed: {err!r}")
            reply.request_id = request.request_id
            try:
                async with writing:
                    await context.write(reply)
            except Exception as err:  # the stream ended meanwhile (the client left): nobody to answer
                log.debug("RunExpertsStream from %s: reply not written (%r)", context.peer(), err)

        async def read_all() -> None:
            async for request in requests:
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)

        reading = asyncio.create_task(read_all())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not reading.done():
                reading.cancel()
            if running:
                await asyncio.wait(set(running))  # what was asked is answered, stopping or not
        if reading.done() and not reading.cancelled() and reading.exception() is not None:
            raise reading.exception()  # the client's side failed: the call is over anyway
        if self._stopping.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING_MESSAGE)  # the coordinator reconnects elsewhere
        log.debug("RunExpertsStream closed by %s", context.peer())

    async def _run(self, request: pb.RunExpertsRequest, context: grpc.aio.ServicerContext) -> pb.RunExpertsReply:
        """One RunExperts request checked and run; RequestRefused for one that cannot be."""
        try:
            plan = plan_run_experts(
                self.shard, layer=request.layer, experts=list(request.experts), dtype=request.dtype,
                shape=list(request.shape), hidden=request.hidden, weights=request.weights, model_id=request.model_id,
            )
            if self.faults.run_delay_s:
                await asyncio.sleep(self.faults.run_delay_s)
            output, compute_s = await self.runner.run(plan)
        except StoreError as err:  # a blob read from disk that shrank or fails its checksum
            raise RequestRefused(grpc.StatusCode.DATA_LOSS, str(err)) from None
        log.debug("RunExperts layer %d experts %s, %d tokens, from %s: %.2f ms", request.layer, list(request.experts),
                  output.shape[0], context.peer(), compute_s * 1e3)
        return pb.RunExpertsReply(shape=list(output.shape), output=output.numpy().tobytes(), compute_s=compute_s)

    def end_streams(self) -> None:
        """The host is stopping: every open RunExpertsStream ends once its requests in flight are
        answered, and new ones are refused (UNAVAILABLE)."""
        self._stopping.set()

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        log.warning("refused a request from %s: %s: %s", context.peer(), code.name, message)
        await context.abort(code, message)


def add_to_server(servicer: ExpertHostServicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=pb.InfoRequest.FromString, response_serializer=pb.InfoReply.SerializeToString,
        ),
        "FetchExpert": grpc.unary_stream_rpc_method_handler(
            servicer.FetchExpert, request_deserializer=pb.FetchExpertRequest.FromString, response_serializer=encode_chunk,
        ),
        "RunExperts": grpc.unary_unary_rpc_method_handler(
            servicer.RunExperts, request_deserializer=pb.RunExpertsRequest.FromString,
            response_serializer=pb.RunExpertsReply.SerializeToString,
        ),
        "RunExpertsStream": grpc.stream_stream_rpc_method_handler(
            servicer.RunExpertsStream, request_deserializer=pb.RunExpertsRequest.FromString,
            response_serializer=pb.RunExpertsReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
