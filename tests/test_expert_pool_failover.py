"""Replicas and failover, against real hosts on 127.0.0.1: a host SIGKILLed mid-generation
changes no token; with no replica left the error names the expert and the hosts tried, and the
same engine works again once a host is back; a host slower than the deadline is skipped; a
chunk corrupted in flight is caught by the checksum."""

import time

import pytest
import torch

from common.errors import ExpertUnavailableError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.rpc.wire_limits import MIN_CHUNK_BYTES
from common.store.reader import ExpertStore
from coordinator.runtime.engine import Engine
from coordinator.runtime.fetch_loop import FetchLoop
from coordinator.sources.cluster_config import ClusterConfig, PoolSettings
from coordinator.sources.expert_pool import ExpertPool
from expert_host_processes import expert_hosts, module_expert_hosts  # noqa: F401  (fixtures)

PROMPT = "A small cache on the graphics card keeps the experts"
# Every expert on two of three hosts: A holds thirds 0+1, B 1+2, C 2+0.
TWO_OF_THREE = ("0-5", "3-7", "0-2,6-7")
FAST_RECOVERY = PoolSettings(fetch_deadline_s=5, info_deadline_s=2, probe_min_s=0.2, probe_max_s=1, chunk_bytes=MIN_CHUNK_BYTES,
                              host_restart_wait_s=1)  # a host that stays dead fails its fetches after 1 s


def pool_source(hosts, settings=FAST_RECOVERY):
    return ExpertPool.source_factory(ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in hosts), pool=settings))


def run(engine, max_new_tokens=16, on_token=None):
    generation = engine.generate(PROMPT, max_new_tokens=max_new_tokens, stop_at_eos=False)
    for count, _ in enumerate(generation, 1):
        if on_token is not None:
            on_token(count)
    return generation


@pytest.fixture(scope="module")
def reference(store16):
    with Engine.open(store16, source="ram", cache_experts=1) as engine:
        return run(engine).token_ids


@pytest.fixture(scope="module")
def unkilled_hosts(module_expert_hosts, store16, shared_store16_host):  # noqa: F811
    """The hosts that no test kills, shared: one slower than any deadline, one that corrupts every
    chunk, and the session's plain host, the replica of both."""
    slow, corrupting = module_expert_hosts.start_many([(store16, "--test-fetch-delay", "30"), (store16, "--test-corrupt-chunks")])
    return slow, corrupting, shared_store16_host


def wait_until(condition, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_host_killed_mid_generation_changes_no_token(expert_hosts, store16, reference):  # noqa: F811
    a, b, c = expert_hosts.start_many([(store16, "--experts", spec) for spec in TWO_OF_THREE])
    with Engine.open(store16, source=pool_source([a, b, c]), cache_experts=1) as engine:
        fetched_before_kill = {}

        def kill_a_after_four_tokens(count):
            if count == 4:
                fetched_before_kill.update(engine.source.fetches_by_origin())
                a.kill()

        generation = run(engine, on_token=kill_a_after_four_tokens)
        assert generation.token_ids == reference
        assert generation.finish_reason == "length"
        assert fetched_before_kill[a.address] > 0  # A really served before it died
        assert engine.source.host_status()[a.address] is False
        assert engine.source.host_status()[b.address] and engine.source.host_status()[c.address]
        assert engine.source.fetches_by_origin()[a.address] == fetched_before_kill[a.address]


def test_no_replica_left_names_expert_and_hosts_tried_and_the_engine_recovers(expert_hosts, store16, reference):  # noqa: F811
    a, b, c = expert_hosts.start_many([(store16, "--experts", spec) for spec in TWO_OF_THREE])
    with Engine.open(store16, source=pool_source([a, b, c]), cache_experts=1) as engine:
        a.kill()
        b.kill()  # experts 3-5 of every layer were on A and B only
        with pytest.raises(ExpertUnavailableError) as failed:
            run(engine)
        message = str(failed.value)
        assert "no expert host could deliver it" in message
        assert a.address in message and b.address in message and c.address not in message
        assert any(f"expert {e}:" in message for e in (3, 4, 5)), message

        b_again = expert_hosts.start(store16, "--experts", TWO_OF_THREE[1], listen=b.address)
        assert b_again.address == b.address
        wait_until(lambda: engine.source.host_status()[b.address])
        generation = run(engine)
        assert generation.token_ids == reference
        assert generation.stats.fetches_by_source[b.address] > 0


def test_a_host_slower_than_the_deadline_is_skipped_for_a_replica(unkilled_hosts, store16, reference):
    slow, _, fast = unkilled_hosts
    settings = PoolSettings(fetch_deadline_s=0.5, info_deadline_s=2, probe_min_s=1, probe_max_s=30, chunk_bytes=MIN_CHUNK_BYTES)
    with Engine.open(store16, source=pool_source([slow, fast], settings), cache_experts=2) as engine:
        started = time.monotonic()
        generation = run(engine)
        elapsed = time.monotonic() - started
        assert generation.token_ids == reference
        stats = generation.stats
        assert stats.fetches_by_source[slow.address] == 0
        assert stats.fetches_by_source[fast.address] == stats.cache_misses + stats.prefetch_issued
        assert "no answer within 0.5 s" in next(h.last_error for h in engine.source._hosts if h.address == slow.address)
        assert elapsed < 20  # a few missed deadlines, not one per fetch


def test_a_chunk_corrupted_in_flight_is_caught_by_the_checksum(unkilled_hosts, store16):
    _, corrupting, good = unkilled_hosts
    store = ExpertStore(store16)
    eid = ExpertId(1, 6)
    loop = FetchLoop()
    try:
        for hosts in ([corrupting], [corrupting, good]):
            cluster = ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in hosts), pool=FAST_RECOVERY)
            pool = ExpertPool.open(cluster, store.manifest, loop)
            out = torch.zeros(store.blob_nbytes, dtype=torch.uint8)
            try:
                if len(hosts) == 1:
                    with pytest.raises(ExpertUnavailableError, match=f"{eid}: no expert host could deliver it.*arrived corrupted"):
                        loop.run(pool.fetch_into(eid, out), timeout=30)
                else:
                    loop.run(pool.fetch_into(eid, out), timeout=30)  # the corrupting host is tried first, then the replica
                    assert torch.equal(out, store.expert_blob(eid))
                    assert pool.host_status() == {corrupting.address: False, good.address: True}
            finally:
                pool.close()
    finally:
        loop.close()
