"""RunExpertsStream: the pool sends its RunExperts requests on one long-lived stream per host
(unless told `run_experts = "unary"`), with the unary call's results, counters, deadline and
failover: a host killed or too slow while a request is in flight on its stream hands the
experts to a replica and its stream is torn down, and opened again once the host is back. On
the host's side a refused request gets an error reply naming the problem and the stream goes
on; a message past the size limit ends that stream only; a graceful stop ends idle streams
at once instead of waiting out its grace period. Real hosts on 127.0.0.1."""

import queue
import threading
import time

import grpc
import pytest
import torch

from common.errors import ExpertUnavailableError
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.rpc.wire_limits import MAX_RUN_EXPERTS_BYTES, channel_options
from coordinator.sources.cluster_config import PoolSettings
from coordinator.sources.host_client import HostClient
from expert_host_processes import expert_hosts, module_expert_hosts  # noqa: F401  (fixtures)
from test_run_experts import HIDDEN, SETTINGS, Pool, good_request, local_sum, step


class OpenStream:
    """A RunExpertsStream from a plain (blocking) gRPC client: requests put in, replies read."""

    def __init__(self, address, options=()):
        self.channel = grpc.insecure_channel(address, options=list(options))
        self._requests: queue.Queue = queue.Queue()
        self.replies = pb_grpc.ExpertHostStub(self.channel).RunExpertsStream(iter(self._requests.get, None), timeout=60)

    def send(self, request_id, request):
        request.request_id = request_id
        self._requests.put(request)

    def close(self):
        self._requests.put(None)
        self.channel.close()


@pytest.fixture(scope="module")
def host(module_expert_hosts, store16):  # noqa: F811
    return module_expert_hosts.start(store16, "--experts", "0-3")


def test_the_pool_keeps_one_stream_per_host_and_gives_what_unary_calls_give(shared_store16_host, store16):
    host = shared_store16_host
    hidden, weights = step(3, torch.float32, seed=3)
    experts = [1, 3]
    expected = local_sum(store16, hidden, weights[:, :2], experts=experts)
    results = {}
    for mode in ("stream", "unary"):
        pool = Pool(store16, host, settings=PoolSettings(**{**SETTINGS.__dict__, "run_experts": mode}))
        try:
            first = pool.run_layer(hidden, weights[:, :2], experts=experts)
            stream = pool.pool._hosts[0].client._run_stream
            second = pool.run_layer(hidden, weights[:, :2], experts=experts)
            assert pool.pool._hosts[0].client._run_stream is stream  # the same stream for the second call
            results[mode] = (first, second, pool.streams_open(), pool.pool.runs_by_origin(), pool.pool.run_bytes_by_origin())
        finally:
            pool.close()
    for mode, (first, second, streams, runs, sent_received) in results.items():
        assert torch.allclose(first, expected, atol=1e-5, rtol=0) and torch.equal(first, second), mode
        assert streams == {host.address: mode == "stream"}
        assert runs == {host.address: 2}
        assert sent_received == {host.address: (2 * (3 * HIDDEN * 4 + 3 * 2 * 4), 2 * 3 * HIDDEN * 4)}  # as unary counted


def test_requests_in_flight_together_on_one_stream_each_get_their_own_reply(shared_store16_host, store16):
    pool = Pool(store16, shared_store16_host)
    try:
        steps = {layer: step(2, torch.float32, seed=10 + layer) for layer in range(4)}
        calls = {layer: pool.loop.submit(pool.pool.run_layer(layer, [0, 5, 7], *steps[layer])) for layer in steps}
        outputs = {layer: call.result(timeout=60) for layer, call in calls.items()}
        assert pool.pool.runs_by_origin() == {shared_store16_host.address: 4}
    finally:
        pool.close()
    for layer, (hidden, weights) in steps.items():
        expected = local_sum(store16, hidden, weights, layer=layer, experts=[0, 5, 7])
        assert torch.allclose(outputs[layer], expected, atol=1e-5, rtol=0), layer


REFUSALS = [
    (dict(experts=[1, 5]), grpc.StatusCode.NOT_FOUND, "layer 2 expert 5: not held"),
    (dict(layer=4), grpc.StatusCode.INVALID_ARGUMENT, "layer 4: the model has layers 0-3"),
    (dict(hidden=bytes(10)), grpc.StatusCode.INVALID_ARGUMENT, "field hidden"),
    (dict(weights=bytes(12)), grpc.StatusCode.INVALID_ARGUMENT, "field weights"),
    (dict(dtype="int8"), grpc.StatusCode.INVALID_ARGUMENT, "dtype 'int8'"),
    (dict(model_id="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION, "0123456789abcdef"),
]


def test_refused_requests_on_a_stream_get_error_replies_naming_the_problem_and_the_stream_goes_on(host):
    stream = OpenStream(host.address)
    try:
        for request_id, (changes, _, _) in enumerate(REFUSALS, start=1):
            stream.send(request_id, good_request(**changes))
        stream.send(100, good_request())
        replies = {reply.request_id: reply for reply in (next(stream.replies) for _ in range(len(REFUSALS) + 1))}
        for request_id, (_, code, words) in enumerate(REFUSALS, start=1):
            reply = replies[request_id]
            assert reply.error_code == code.value[0] and words in reply.error_message and not reply.output
        assert replies[100].error_code == 0 and list(replies[100].shape) == [2, HIDDEN]
        stream.send(101, good_request())  # the same stream still answers
        assert next(stream.replies).request_id == 101
    finally:
        stream.close()


def test_an_oversize_request_ends_its_stream_only_and_the_host_keeps_serving(host):
    tokens = MAX_RUN_EXPERTS_BYTES // (HIDDEN * 4) + 1
    oversize = good_request(shape=[tokens, HIDDEN], hidden=bytes(tokens * HIDDEN * 4), weights=bytes(tokens * 2 * 4))
    stream = OpenStream(host.address, options=[("grpc.max_send_message_length", 2 * MAX_RUN_EXPERTS_BYTES)])
    try:
        stream.send(1, oversize)
        with pytest.raises(grpc.RpcError) as ended:
            next(stream.replies)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stream.close()
    again = OpenStream(host.address)
    try:
        again.send(7, good_request())
        reply = next(again.replies)
        assert reply.request_id == 7 and list(reply.shape) == [2, HIDDEN]
    finally:
        again.close()


def test_a_host_killed_while_its_stream_runs_a_request_hands_the_experts_to_the_replica(expert_hosts, store16):  # noqa: F811
    slow, replica = expert_hosts.start_many([(store16, "--test-run-delay", "3"), (store16,)])
    hidden, weights = step(2, torch.float32, seed=4)
    expected = local_sum(store16, hidden, weights)
    pool = Pool(store16, slow, replica)
    try:
        call = pool.loop.submit(pool.pool.run_layer(2, [1, 6, 3], hidden, weights))  # ties go to the first host: slow
        deadline = time.monotonic() + 10
        while not pool.streams_open()[slow.address]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # the request is on the slow host's stream, waiting out its delay
        slow.kill()
        assert torch.allclose(call.result(timeout=30), expected, atol=1e-5, rtol=0)
        assert pool.pool.host_status() == {slow.address: False, replica.address: True}
        assert pool.streams_open() == {slow.address: False, replica.address: True}
        assert pool.pool.runs_by_origin() == {slow.address: 0, replica.address: 1}
    finally:
        pool.close()


def test_a_stream_request_past_the_deadline_goes_to_the_replica_and_that_stream_is_torn_down(expert_hosts, store16):  # noqa: F811
    slow, replica = expert_hosts.start_many([(store16, "--test-run-delay", "30"), (store16,)])
    hidden, weights = step(1, torch.float32, seed=5)
    pool = Pool(store16, slow, replica)
    try:
        started = time.monotonic()
        out = pool.run_layer(hidden, weights, timeout_s=0.5)
        assert time.monotonic() - started < 10
        assert torch.allclose(out, local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
        assert pool.streams_open() == {slow.address: False, replica.address: True}
        assert "no answer within 0.5 s" in next(h.last_error for h in pool.pool._hosts if h.address == slow.address)
    finally:
        pool.close()


def test_a_host_back_after_a_crash_gets_a_new_stream(expert_hosts, store16, monkeypatch):  # noqa: F811
    # The run connection's reconnect backoff made long, so that when the host is marked up (on
    # the main connection) the run connection is surely still waiting out its backoff: the run
    # after the restart passes only if the client renews it. (With gRPC's own backoff, at most a
    # second, the run came in that window now and then.)
    def with_a_long_backoff_for_runs(self, extra_options=None):
        long_backoff = [("grpc.initial_reconnect_backoff_ms", 60_000), ("grpc.min_reconnect_backoff_ms", 60_000),
                        ("grpc.max_reconnect_backoff_ms", 60_000)] if extra_options else []
        # first: gRPC takes the first of two settings of one name
        return grpc.aio.insecure_channel(self.address.grpc_target,
                                         options=long_backoff + channel_options() + (extra_options or []))

    monkeypatch.setattr(HostClient, "_open_channel", with_a_long_backoff_for_runs)
    first = expert_hosts.start(store16)
    hidden, weights = step(1, torch.float32, seed=6)
    expected = local_sum(store16, hidden, weights)
    pool = Pool(store16, first)
    try:
        assert torch.allclose(pool.run_layer(hidden, weights), expected, atol=1e-5, rtol=0)
        first.kill()
        for _ in range(2):  # the first may fail on the open stream; the second, on a new connection
            with pytest.raises(ExpertUnavailableError):
                pool.run_layer(hidden, weights)
        assert pool.streams_open() == {first.address: False}
        again = expert_hosts.start(store16, listen=first.address)
        deadline = time.monotonic() + 20
        while not pool.pool.host_status()[again.address]:
            assert time.monotonic() < deadline, "the restarted host was not marked up"
            time.sleep(0.05)
        assert torch.allclose(pool.run_layer(hidden, weights), expected, atol=1e-5, rtol=0)
        assert pool.streams_open() == {again.address: True}
    finally:
        pool.close()


def test_a_graceful_stop_ends_an_idle_stream_well_within_its_grace_period(expert_hosts, store16):  # noqa: F811
    host = expert_hosts.start(store16, "--experts", "0-3", "--grace-period", "30")
    stream = OpenStream(host.address)
    ended = {}

    def read_to_the_end():
        try:
            for reply in stream.replies:
                ended.setdefault("replies", []).append(reply.request_id)
        except grpc.RpcError as err:
            ended["status"] = (err.code(), err.details())

    try:
        stream.send(1, good_request())
        reader = threading.Thread(target=read_to_the_end)
        reader.start()
        deadline = time.monotonic() + 10
        while "replies" not in ended:  # the stream is open and answered; now idle
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        assert host.stop() == 0
        assert time.monotonic() - started < 5  # not the 30 s grace period
        reader.join(10)
        assert ended["replies"] == [1]
        assert ended["status"][0] == grpc.StatusCode.UNAVAILABLE and "stopping" in ended["status"][1]
    finally:
        stream.close()
