"""RunStream: one open RunExpertsStream to one expert host. Each request gets a fresh request_id
and a future; a reader task matches every reply to its future by that id (replies come in the
order the host finishes them).

What ends a stream ends it for every request in flight on it: the host's status (it stopped,
died, refused our token), a reply for an id we did not ask, or `close` (a missed deadline, a
reply of the wrong shape, the client closing). A closed stream stays closed; HostClient opens a
new one at its next call. Knows nothing of tensors or of replicas: messages in, messages out,
errors as the HostCallError that `describe` makes of a gRPC status. Made and used on the fetch
loop only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from common.errors import HostError
from common.rpc import expert_host_pb2 as pb

from .host_call_error import HostCallError


class RunStream:
    def __init__(self, call: grpc.aio.StreamStreamCall, describe: Callable[[grpc.aio.AioRpcError], HostError],
                 name: str) -> None:
        self._call = call
        self._describe = describe  # a gRPC status that ended the stream -> the error of every request on it
        self._name = name  # the host, for errors
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1  # 0 is what a unary call leaves in request_id
        self._writing = asyncio.Lock()  # one write at a time on a call
        self.failure: HostError | None = None  # set once the stream is closed: why
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def closed(self) -> bool:
        return self.failure is not None

    async def exchange(self, request: pb.RunExpertsRequest) -> pb.RunExpertsReply:
        """Send `request` (its request_id is set here) and wait for its reply; raises the
        stream's failure if it ends first. The caller bounds the wait (and closes the stream
        when it gives up)."""
        if self.failure is not None:
            raise self.failure
        request.request_id = request_id = self._next_id
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                async with self._writing:
                    await self._call.write(request)
            except grpc.aio.AioRpcError as err:
                self.close(self._describe(err))
            except (asyncio.InvalidStateError, grpc.aio.UsageError):  # the call ended: the reader says why
                await asyncio.wait({self._reader}, timeout=1.0)
                self.close(HostCallError(f"{self._name}: its RunExperts stream ended"))
            except asyncio.CancelledError:
                if self.failure is None:  # this call itself was cancelled (its deadline): the caller closes the stream
                    raise
                # else the stream was closed (another call's failure) while this write waited: its failure is ours
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        failure = None
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    failure = HostCallError(f"{self._name}: ended its RunExperts stream")
                    break
                future = self._pending.pop(reply.request_id, None)
                if future is None:
                    failure = HostCallError(f"{self._name}: answered RunExperts request {reply.request_id}, which is not "
                                        "in flight on its stream")
                    break
                if not future.done():  # done: its caller gave up on it
                    future.set_result(reply)
        except grpc.aio.AioRpcError as err:
            failure = self._describe(err)
        except asyncio.CancelledError:
            failure = self.failure or HostCallError(f"{self._name}: its RunExperts stream was closed")
        finally:
            self.close(failure or HostCallError(f"{self._name}: its RunExperts stream failed"))

    async def ended(self, timeout_s: float = 1.0) -> None:
        """Once closed: wait for the reader to finish, then let go of the call. The errors of a
        stream's end sit in reference cycles (their tracebacks hold our frames) that would keep
        the call, and with it the connection of a channel closed next, alive until the garbage
        collector runs."""
        await asyncio.wait({self._reader}, timeout=timeout_s)
        self._call = None

    def close(self, failure: HostError) -> None:
        """End the stream: every request in flight on it fails with `failure` (the first
        failure given is kept)."""
        if self.failure is None:
            self.failure = failure
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self.failure)
        self._pending.clear()
        if self._call is not None:
            self._call.cancel()  # no-op once the call is over
        if self._reader is not asyncio.current_task():
            self._reader.cancel()
