"""Greedy output must not depend on cache size, prefetch, or where experts come from; the
cache's counters add up."""

import pytest

from coordinator.runtime.engine import Engine

PROMPT = "A small cache on the graphics card keeps the experts"


def greedy_tokens(store, **options) -> list[int]:
    with Engine.open(store, **options) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
        list(generation)
        return generation.token_ids


@pytest.fixture(scope="module")
def reference_tokens(store16):
    return greedy_tokens(store16, cache_experts=8, prefetch=False, source="ram")


@pytest.mark.parametrize("cache_experts", [1, 2, 8])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("source", ["ram", "disk"])
def test_greedy_tokens_do_not_depend_on_cache_size_prefetch_or_source(store16, reference_tokens, cache_experts, prefetch, source):
    assert greedy_tokens(store16, cache_experts=cache_experts, prefetch=prefetch, source=source) == reference_tokens


def test_deeper_prefetch_gives_the_same_tokens(store16, reference_tokens):
    assert greedy_tokens(store16, cache_experts=3, prefetch_depth=3) == reference_tokens


@pytest.mark.parametrize("cache_experts,prefetch", [(1, True), (2, True), (2, False), (8, True)])
def test_cache_counters_add_up_to_expert_uses(store16, cache_experts, prefetch):
    with Engine.open(store16, cache_experts=cache_experts, prefetch=prefetch) as engine:
        uses = 0
        begin_layer = engine.cache.begin_layer

        def counting_begin_layer(layer, needed):
            nonlocal uses
            uses += len(needed)
            return begin_layer(layer, needed)

        engine.cache.begin_layer = counting_begin_layer
        generation = engine.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
        list(generation)
    stats = generation.stats
    assert uses > 0
    assert stats.cache_hits + stats.cache_misses == uses
    assert stats.prefetch_hits <= stats.cache_hits
    assert stats.prefetch_hits + stats.prefetch_wasted <= stats.prefetch_issued
    blob = engine.store.blob_nbytes
    assert stats.bytes_fetched == blob * (stats.cache_misses + stats.prefetch_issued)
    assert stats.bytes_by_source["ram"] == stats.bytes_fetched
    if not prefetch:
        assert stats.prefetch_issued == stats.prefetch_hits == 0
    if cache_experts == 8:  # everything fits: each expert is fetched at most once
        assert stats.bytes_fetched <= blob * engine.config.num_layers * engine.config.num_experts
