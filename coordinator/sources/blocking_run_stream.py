"""BlockingRunStream: one RunExpertsStream to one expert host, driven by the thread that waits for
each reply (the token loop's). grpcio's synchronous API reads a reply on the thread that asks for
it, so a run costs no hand-off to the fetch loop and back: on the H200's VM a round trip took
0.43 ms so against 0.80 submitted to the fetch loop, on the 2-core sandbox 0.78 against 1.21
(scripts/run_experts_hops.py, the host answering at once).

One request in flight at a time: `send` it, then `receive` its reply. A watchdog thread cancels
the call when a request outlives its deadline (gRPC's synchronous streams have no deadline per
message). Whatever goes wrong closes the stream for good, and the caller runs the layer the
fetch loop's way instead, where failover, marking down and probing live (expert_pool.py). Knows
nothing of tensors or replicas: messages in, messages out, errors as HostCallError."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import grpc

from common.rpc import expert_host_pb2 as pb

from .host_call_error import HostCallError

WATCHDOG_PERIOD_S = 0.05  # how late past its deadline a request may be cancelled


class RequestGivenUp(HostCallError):
    """This thread's last request on the stream was never asked for its reply: our doing, not
    the host's (the stream is closed; a new one takes the next request)."""


class BlockingRunStream:
    def __init__(self, open_stream: Callable, describe: Callable[[grpc.RpcError, float], HostCallError],
                 name: str) -> None:
        """`open_stream(requests)`: the stub's RunExpertsStream over an iterator of requests;
        `describe(err, timeout_s)`: the HostCallError of a status that ended the call."""
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = open_stream(iter(self._requests.get, None))
        self._describe, self._name = describe, name
        self._next_id = 1
        self._in_flight: tuple[int, int, float] | None = None  # (request id, the sending thread, deadline)
        self._lock = threading.Lock()  # taken only to claim or free the one request in flight
        self._timed_out = False
        self.failure: HostCallError | None = None  # set once closed: why
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"moe-edge-run-deadlines {name}", daemon=True)
        self._watchdog.start()

    @property
    def closed(self) -> bool:
        return self.failure is not None

    def send(self, request: pb.RunExpertsRequest, timeout_s: float) -> int | None:
        """Put `request` on the stream (its request_id set here); its id, or None where another
        thread has a request in flight (that caller goes the fetch loop's way). A request of this
        thread's own still in flight was given up (its reply never asked for): the stream is
        closed and RequestGivenUp raised, so that its reply cannot be taken for this one's."""
        me = threading.get_ident()
        with self._lock:
            if self.failure is not None:
                raise self.failure
            if self._in_flight is not None:
                if self._in_flight[1] != me:
                    return None
                self.close(RequestGivenUp(f"{self._name}: a RunExperts request was given up on its stream"))
                raise self.failure
            request.request_id = request_id = self._next_id
            self._next_id += 1
            self._in_flight = (request_id, me, time.monotonic() + timeout_s)
        self._requests.put(request)
        return request_id

    def receive(self, request_id: int, timeout_s: float) -> pb.RunExpertsReply:
        """Block until the reply to `request_id` comes; raises HostCallError (and closes the
        stream) where the call ends, the deadline passes or the host answers another id."""
        try:
            reply = next(self._replies)
        except StopIteration:
            self.close(HostCallError(f"{self._name}: ended its RunExperts stream"))
            raise self.failure from None
        except grpc.RpcError as err:
            if self._timed_out:
                error = HostCallError(f"{self._name}: no answer within {timeout_s:g} s on its RunExperts stream",
                                      grpc.StatusCode.DEADLINE_EXCEEDED)
            else:
                error = self._describe(err, timeout_s)
            self.close(error)
            raise self.failure from None
        finally:
            with self._lock:
                self._in_flight = None
        if self._timed_out:  # the reply came as the watchdog cancelled the call: a new stream takes the next request
            self.close(HostCallError(f"{self._name}: its RunExperts stream was cancelled at a deadline",
                                     grpc.StatusCode.DEADLINE_EXCEEDED))
        if reply.request_id != request_id:
            self.close(HostCallError(f"{self._name}: answered RunExperts request {reply.request_id} where "
                                     f"{request_id} was in flight on its stream"))
            raise self.failure
        return reply

    def _watch(self) -> None:
        while not self._closed.wait(WATCHDOG_PERIOD_S):
            in_flight = self._in_flight
            if in_flight is not None and time.monotonic() > in_flight[2]:
                self._timed_out = True
                self._replies.cancel()  # the blocked next() raises CANCELLED

    def close(self, failure: HostCallError) -> None:
        """End the stream (the first failure given is kept); the watchdog stops."""
        if self.failure is None:
            self.failure = failure
        self._closed.set()
        self._requests.put(None)  # ends the request iterator: the call's sending side closes
        self._replies.cancel()  # no-op once the call is over
