"""4-bit and 2-bit stores generate, and their first-step logits stay near transformers' float32
logits. Bounds (relative L2 error of the last prompt position's logits, random weights of std
0.02, which quantize worse than trained ones): 4-bit experts + 4-bit attention < 0.35;
2-bit experts (attention unquantized) < 0.35. An unrelated logit vector would be ~1.4."""

import pytest
import torch

from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache

RELATIVE_ERROR_BOUND = {"store4": 0.35, "store2": 0.35}


@pytest.fixture(scope="module")
def reference_logits(tiny_model_dir):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (32,), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return ids, model(ids[None]).logits[0, -1]


@pytest.mark.parametrize("store_name", ["store4", "store2"])
def test_quantized_first_step_logits_stay_within_the_stated_bound(request, store_name, reference_logits):
    store = request.getfixturevalue(store_name)
    ids, reference = reference_logits
    with Engine.open(store, cache_experts=8) as engine, torch.inference_mode():
        kv = KVCache(engine.config, 64, torch.device("cpu"), torch.float32)
        logits = engine.model.forward(ids, 0, kv)[0]
    error = ((logits - reference).norm() / reference.norm()).item()
    assert error < RELATIVE_ERROR_BOUND[store_name], f"{store_name}: relative error {error:.3f}"


@pytest.mark.parametrize("store_name", ["store4", "store2"])
def test_quantized_stores_generate_the_same_tokens_for_every_cache_size(request, store_name):
    store = request.getfixturevalue(store_name)
    results = []
    for cache_experts, prefetch in [(1, False), (2, True), (8, True)]:
        with Engine.open(store, cache_experts=cache_experts, prefetch=prefetch) as engine:
            generation = engine.generate("Hello world", max_new_tokens=12, stop_at_eos=False)
            list(generation)
            results.append(generation.token_ids)
    assert len(results[0]) == 12
    assert results[0] == results[1] == results[2]


def test_quantized_store_is_smaller_than_the_checkpoint(store16, store4, store2):
    from common.store.manifest import Manifest

    sizes = {name: Manifest.read(store).layout.nbytes for name, store in [("16", store16), ("4", store4), ("2", store2)]}
    assert sizes["16"] / sizes["4"] > 6.5  # float32 -> 4.5 bits/param
    assert sizes["4"] > sizes["2"]
