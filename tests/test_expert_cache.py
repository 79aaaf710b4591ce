"""The expert cache on its own, with a fake source: LRU order, K = 1, never evicting what the
current layer still needs, failed loads, counters. No model, no files."""

import asyncio
import time

import pytest
import torch

from common.errors import StoreError
from common.expert_id import ExpertId
from common.model_config import ModelConfig
from common.quantization import QuantSpec
from common.store.blob_layout import BlobLayout
from coordinator.runtime.expert_cache import ExpertCache
from coordinator.runtime.expert_loader import ExpertLoader
from coordinator.runtime.fetch_loop import FetchLoop

CONFIG = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=4, num_experts=4, top_k=2, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=32, sliding_window=None, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2)
LAYOUT = BlobLayout.for_expert(CONFIG, QuantSpec(16), torch.float32)


class FakeSource:
    """Blob of expert e of layer l is filled with the byte 16*l + e; some experts can fail."""

    name = "fake"
    blob_nbytes = LAYOUT.nbytes

    def __init__(self):
        self.fetched: list[ExpertId] = []
        self.failing: set[ExpertId] = set()
        self.gate: asyncio.Event | None = None

    def resident_blob(self, eid):
        return None

    async def fetch_into(self, eid, out):
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 5)
        self.fetched.append(eid)
        if eid in self.failing:
            raise StoreError(f"{eid}: broken on purpose")
        out.fill_(16 * eid.layer + eid.expert)

    def bytes_by_origin(self):
        return {"fake": len(self.fetched) * self.blob_nbytes}

    def close(self):
        pass


@pytest.fixture
def cache_of():
    loops = []

    def make(slots: int, source: FakeSource | None = None):
        loop = FetchLoop()
        loops.append(loop)
        source = source or FakeSource()
        loader = ExpertLoader(source, torch.device("cpu"), loop)
        return ExpertCache(layout=LAYOUT, num_layers=2, slots_per_layer=slots, device=torch.device("cpu"),
                           loader=loader, load_timeout_s=10), source

    yield make
    for loop in loops:
        loop.close()


def use(cache, layer, needed):
    """Run one layer as the MoE block does; return the first byte of each expert's weights."""
    seen = {}
    for expert in cache.begin_layer(layer, needed):
        weights = cache.get(layer, expert)
        seen[expert] = int(weights.w13.view(torch.uint8)[0, 0])
        cache.done(layer, expert)
    return seen


def test_one_slot_passes_the_layers_experts_through_in_turn(cache_of):
    cache, source = cache_of(1)
    assert use(cache, 0, [1, 3]) == {1: 1, 3: 3}
    assert cache.counters.misses[0] == 2 and cache.counters.hits[0] == 0
    assert cache.resident(0) == [3]


def test_least_recently_used_expert_is_evicted(cache_of):
    cache, source = cache_of(2)
    use(cache, 0, [0, 1])
    use(cache, 0, [1])  # 1 is now more recent than 0
    use(cache, 0, [2])
    assert sorted(cache.resident(0)) == [1, 2]
    assert cache.counters.hits[0] == 1 and cache.counters.misses[0] == 3


def test_experts_the_layer_still_needs_are_never_evicted(cache_of):
    cache, source = cache_of(2)
    use(cache, 0, [0, 1])
    order = cache.begin_layer(0, [1, 2])
    assert order[0] == 1  # resident first
    assert 1 in cache.resident(0) and 2 in cache.resident(0)  # 0 was evicted for 2, never 1
    for expert in order:
        cache.get(0, expert)
        cache.done(0, expert)


def test_layers_have_their_own_slots(cache_of):
    cache, source = cache_of(1)
    assert use(cache, 0, [2]) == {2: 2}
    assert use(cache, 1, [2]) == {2: 18}
    assert cache.resident(0) == [2] and cache.resident(1) == [2]


def test_prefetch_hits_and_waste_are_counted(cache_of):
    cache, source = cache_of(2)
    cache.prefetch(1, [0, 3])
    use(cache, 1, [3, 1])  # 3 was prefetched (a hit); 1 misses and evicts the unused prefetch of 0
    counters = cache.counters
    assert counters.prefetch_issued[1] == 2 and counters.prefetch_hits[1] == 1
    assert counters.prefetch_wasted[1] == 1
    assert counters.hits[1] == 1 and counters.misses[1] == 1


def test_a_failed_load_names_the_expert_and_leaves_the_cache_usable(cache_of):
    cache, source = cache_of(2)
    source.failing.add(ExpertId(0, 1))
    with pytest.raises(StoreError, match="layer 0 expert 1"):
        use(cache, 0, [1])
    assert cache.resident(0) == []
    source.failing.clear()
    assert use(cache, 0, [1]) == {1: 1}


def test_a_failed_prefetch_is_retried_as_a_demand_load(cache_of):
    cache, source = cache_of(2)
    source.failing.add(ExpertId(1, 2))
    cache.prefetch(1, [2])
    deadline = time.monotonic() + 5
    while ExpertId(1, 2) not in source.fetched and time.monotonic() < deadline:  # the prefetch has failed
        time.sleep(0.001)
    source.failing.clear()
    assert use(cache, 1, [2]) == {2: 18}
    assert source.fetched.count(ExpertId(1, 2)) == 2


def test_landed_is_true_only_once_every_expert_is_in_its_slot(cache_of):
    """What placement auto times a clear layer by: a prefetch held back at its source is
    held but not landed; once its load is done it is; an expert not held never is."""
    source = FakeSource()
    cache, _ = cache_of(2, source)
    source.gate = asyncio.Event()
    cache.prefetch(0, [1])
    assert cache.resident(0) == [1] and not cache.landed(0, [1])
    cache.loader.fetch_loop.loop.call_soon_threadsafe(source.gate.set)  # the source answers now
    deadline = time.monotonic() + 5
    while not cache.landed(0, [1]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.landed(0, [1])
    assert not cache.landed(0, [1, 2])
