"""RunExperts from the waiting thread (coordinator/sources/blocking_run_stream.py): the pool's
start_run_here / finish_run_here give run_layer's sum and counters on a blocking stream per host,
kept between calls; a host too slow for the deadline or killed mid-request hands its experts to a
replica through run_layer (marked down, its stream torn down); another thread's request in flight
sends the caller the fetch loop's way; a request given up on does not leave its reply to be taken
for the next one's. Real hosts on 127.0.0.1."""

import threading
import time

import torch

from coordinator.sources.cluster_config import PoolSettings
from expert_host_processes import expert_hosts, module_expert_hosts  # noqa: F401  (fixtures)
from test_run_experts import EXPERTS, HIDDEN, LAYER, SETTINGS, Pool, local_sum, step


def run_here(pool: Pool, hidden, weights, experts=EXPERTS):
    runs = pool.pool.start_run_here(LAYER, experts, hidden, weights)
    assert runs is not None
    return pool.pool.finish_run_here(runs)


def blocking_open(pool: Pool) -> dict[str, bool]:
    return {host.address: host.client.blocking_run_stream_open for host in pool.pool._hosts}


def test_runs_sent_from_this_thread_give_run_layers_sum_and_counters_on_one_kept_stream(shared_store16_host, store16):
    host = shared_store16_host
    hidden, weights = step(3, torch.float32, seed=3)
    pool = Pool(store16, host)
    client = pool.pool._hosts[0].client
    try:
        first = run_here(pool, hidden, weights)
        stream = client._blocking_stream
        second = run_here(pool, hidden, weights)
        assert client._blocking_stream is stream
        on_loop = pool.run_layer(hidden, weights)
        assert torch.allclose(first, local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
        assert torch.equal(first, second) and torch.equal(first, on_loop)
        assert pool.pool.runs_by_origin() == {host.address: 3}
        assert pool.pool.run_bytes_by_origin() == {host.address: (3 * (3 * HIDDEN * 4 + 3 * 3 * 4), 3 * 3 * HIDDEN * 4)}
        assert pool.pool.run_compute_seconds_by_origin()[host.address] > 0
    finally:
        pool.close()
    assert not client.blocking_run_stream_open and stream.closed  # closed with the pool


def test_a_blocking_request_past_the_deadline_goes_to_the_replica_and_that_stream_is_torn_down(expert_hosts, store16):  # noqa: F811
    slow, replica = expert_hosts.start_many([(store16, "--test-run-delay", "30"), (store16,)])
    hidden, weights = step(1, torch.float32, seed=5)
    pool = Pool(store16, slow, replica, settings=PoolSettings(**{**SETTINGS.__dict__, "fetch_deadline_s": 0.5}))
    try:
        started = time.monotonic()
        out = run_here(pool, hidden, weights)  # ties go to the first host: slow
        assert time.monotonic() - started < 10
        assert torch.allclose(out, local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
        assert blocking_open(pool)[slow.address] is False
        assert pool.pool.host_status() == {slow.address: False, replica.address: True}
        assert "no answer within 0.5 s" in next(h.last_error for h in pool.pool._hosts if h.address == slow.address)
        assert pool.pool.runs_by_origin() == {slow.address: 0, replica.address: 1}
    finally:
        pool.close()


def test_a_host_killed_while_a_blocking_request_waits_hands_the_experts_to_the_replica(expert_hosts, store16):  # noqa: F811
    slow, replica = expert_hosts.start_many([(store16, "--test-run-delay", "3"), (store16,)])
    hidden, weights = step(2, torch.float32, seed=4)
    pool = Pool(store16, slow, replica)
    try:
        runs = pool.pool.start_run_here(LAYER, EXPERTS, hidden, weights)
        assert [host.address for host, *_ in runs.sent] == [slow.address]
        time.sleep(0.3)  # the request is on the slow host's stream, waiting out its delay
        slow.kill()
        assert torch.allclose(pool.pool.finish_run_here(runs), local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
        assert pool.pool.host_status() == {slow.address: False, replica.address: True}
        assert pool.pool.runs_by_origin() == {slow.address: 0, replica.address: 1}
        again = run_here(pool, hidden, weights)  # the dead host is down: the replica's stream now
        assert torch.allclose(again, local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
        assert blocking_open(pool) == {slow.address: False, replica.address: True}
    finally:
        pool.close()


def test_another_threads_request_in_flight_sends_the_caller_the_fetch_loops_way(expert_hosts, store16):  # noqa: F811
    host = expert_hosts.start(store16, "--test-run-delay", "1")
    hidden, weights = step(1, torch.float32, seed=6)
    pool = Pool(store16, host)
    try:
        runs = pool.pool.start_run_here(LAYER, EXPERTS, hidden, weights)
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(pool.pool.start_run_here(LAYER, EXPERTS, hidden, weights)))
        thread.start()
        thread.join(10)
        assert elsewhere == [None]
        assert torch.allclose(pool.pool.finish_run_here(runs), local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
    finally:
        pool.close()


def test_a_request_given_up_on_is_not_taken_for_the_next_ones_reply(shared_store16_host, store16):
    host = shared_store16_host
    pool = Pool(store16, host)
    try:
        given_up, _ = step(1, torch.float32, seed=7)
        hidden, weights = step(1, torch.float32, seed=8)
        assert pool.pool.start_run_here(LAYER, EXPERTS, given_up, weights) is not None  # its reply never read
        stream = pool.pool._hosts[0].client._blocking_stream
        out = run_here(pool, hidden, weights)  # on a new stream; the host is not blamed
        assert torch.allclose(out, local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
        assert stream.closed and pool.pool._hosts[0].client._blocking_stream is not stream
        assert blocking_open(pool)[host.address] and pool.pool.host_status() == {host.address: True}
    finally:
        pool.close()
