"""Greedy tokens through expert hosts equal the in-process source's: one host holding every
expert (in RAM, or memory-mapped), and three hosts each holding a third of them. Real hosts on 127.0.0.1; chunks of
64 KiB so every expert really streams in several chunks."""

import pytest

from common.host_address import HostAddress
from common.rpc.wire_limits import MIN_CHUNK_BYTES
from coordinator.runtime.engine import Engine
from coordinator.sources.cluster_config import ClusterConfig, PoolSettings
from coordinator.sources.expert_pool import ExpertPool
from expert_host_processes import module_expert_hosts  # noqa: F401  (fixture)

PROMPT = "A small cache on the graphics card keeps the experts"
THIRDS = ("0-2", "3-5", "6-7")  # experts of every layer


def greedy(store, source, **options):
    with Engine.open(store, source=source, **options) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
        list(generation)
    return generation


def pool_of(*hosts):
    cluster = ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in hosts),
                            pool=PoolSettings(chunk_bytes=MIN_CHUNK_BYTES, fetch_deadline_s=30))
    return ExpertPool.source_factory(cluster)


@pytest.fixture(scope="module")
def reference(store16):
    return greedy(store16, "ram", cache_experts=2).token_ids


@pytest.fixture(scope="module")
def hosts(module_expert_hosts, store16, shared_store16_host):  # noqa: F811
    mapped, *thirds = module_expert_hosts.start_many([(store16, "--mmap")] + [(store16, "--experts", third) for third in THIRDS])
    return {"in RAM": shared_store16_host, "memory-mapped": mapped}, thirds


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("holding", ["in RAM", "memory-mapped"])
def test_greedy_tokens_through_one_host_equal_the_in_process_source(store16, reference, hosts, holding, prefetch):
    whole = hosts[0][holding]
    generation = greedy(store16, pool_of(whole), cache_experts=2, prefetch=prefetch)
    assert generation.token_ids == reference
    stats = generation.stats
    assert stats.bytes_by_source[whole.address] == stats.bytes_fetched > 0
    assert stats.fetches_by_source[whole.address] == stats.cache_misses + stats.prefetch_issued


def test_greedy_tokens_through_three_hosts_each_holding_a_third_equal_the_in_process_source(store16, reference, hosts):
    _, thirds = hosts
    generation = greedy(store16, pool_of(*thirds), cache_experts=2)
    assert generation.token_ids == reference
    per_host = generation.stats.fetches_by_source
    assert set(per_host) == {h.address for h in thirds}
    assert all(count > 0 for count in per_host.values()), per_host
    assert sum(generation.stats.bytes_by_source.values()) == generation.stats.bytes_fetched
