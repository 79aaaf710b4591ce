"""With every expert resident (bench's `resident` mode) the decoder runs the whole token without
reading the routing back: the chosen experts' slots come from a device-side expert -> slot table.
It must give the per-layer path's logits and tokens (here, off CUDA, the same numbers exactly),
count every use as a hit, and go back to the per-layer path once a slot changes hands. The
in-place slot kernels it runs on CUDA (kernels/slot_experts.py) are checked against float64
math, under Triton's CPU interpreter here and for real on a GPU."""

import pytest
import torch

from conftest import check_kernels, needs_triton, requires_cuda
from coordinator.runtime.decoder import Decoder
from coordinator.runtime.engine import Engine
from greedy_decode import greedy_steps

STEPS = 8


def decode(engine: Engine, device: torch.device, *, resident_path: bool) -> tuple[list[int], torch.Tensor, Decoder]:
    """Greedy steps from a fixed prompt through a fresh decoder: (tokens, logits [STEPS, V], decoder).
    (device: the engine's, named by the caller.)"""
    assert engine.device.type == device.type
    run = greedy_steps(engine, STEPS, decoder=lambda kv: Decoder(engine.model, kv, cuda_graphs=True,
                                                                 resident_path=resident_path))
    return run.tokens, run.logits, run.decoder


@pytest.mark.parametrize("store_name", ["store16", "store4", "store2"])
def test_the_resident_path_gives_the_per_layer_paths_logits_exactly(request, store_name):
    store = request.getfixturevalue(store_name)
    with Engine.open(store, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        per_layer_tokens, per_layer, decoder = decode(engine, torch.device("cpu"), resident_path=False)
        assert not decoder.resident
        tokens, resident, decoder = decode(engine, torch.device("cpu"), resident_path=True)
        assert decoder.resident
        assert tokens == per_layer_tokens
        assert torch.equal(resident, per_layer)


def test_the_resident_path_finds_experts_that_sit_out_of_order_through_the_slot_table(store4):
    with Engine.open(store4, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        per_layer_tokens, per_layer, _ = decode(engine, torch.device("cpu"), resident_path=False)
        cache, experts = engine.cache, engine.config.num_experts
        for layer in cache.expert_layers:  # expert e moves to slot E-1-e
            for slot in range(experts):
                cache._evict(layer, slot)
            for expert in reversed(range(experts)):
                cache.begin_layer(layer, [expert])
                cache.acquire(layer, expert)
                cache.done(layer, expert)
        assert cache.slot_map(experts)[cache.expert_layers[0]] == list(reversed(range(experts)))
        tokens, resident, decoder = decode(engine, torch.device("cpu"), resident_path=True)
        assert decoder.resident and decoder.expert_slots  # the table is read
        assert tokens == per_layer_tokens
        assert torch.equal(resident, per_layer)


def test_resident_decode_counts_every_use_as_a_hit(store4):
    with Engine.open(store4, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        before = engine.snapshot()
        decode(engine, torch.device("cpu"), resident_path=True)
        delta = engine.snapshot().since(before)
        c = engine.config
        prompt_uses = delta.total("hits") - STEPS * c.top_k * len(c.moe_layers)
        assert delta.total("misses") == 0 and delta.total("bytes_fetched") == 0
        assert prompt_uses > 0  # the prompt's hits, counted by the cache as before
        assert delta.per_layer["hits"][c.moe_layers[0]] >= STEPS * c.top_k


def test_a_slot_changing_hands_sends_the_decoder_back_to_the_per_layer_path(store4):
    with Engine.open(store4, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        tokens, logits, decoder = decode(engine, torch.device("cpu"), resident_path=True)
        assert decoder.resident
        engine.cache._evict(engine.config.moe_layers[0], 0)  # expert 0 of the first layer leaves
        prompt = engine.encode("The quick brown fox")
        decoder.step(tokens[0], len(prompt))
        assert not decoder.resident  # recaptured: the per-layer path loads the expert again if asked


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("store_name", ["store4", "store2"])
@requires_cuda
def test_the_resident_token_graph_gives_the_per_layer_graphs_tokens_on_cuda(request, store_name, dtype):
    """store4's shapes take the in-place kernels, store2's (w13 rows of 32 bytes) the staging copy."""
    store = request.getfixturevalue(store_name)
    with Engine.open(store, device="cuda", dtype=dtype, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        want, per_layer, _ = decode(engine, torch.device("cuda"), resident_path=False)
        tokens, resident, decoder = decode(engine, torch.device("cuda"), resident_path=True)
        assert decoder.resident and decoder.token_graph is not None
        assert tokens == want
        scale = per_layer.float().abs().max().item()
        assert (resident.float() - per_layer.float()).abs().max().item() < 5e-2 * scale


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernels here")
def test_slot_kernels_match_float64_math_in_the_cpu_interpreter():
    check_kernels("tests.slot_expert_check", "cpu")


@requires_cuda
@needs_triton
def test_slot_kernels_match_float64_math_on_the_gpu():
    check_kernels("tests.slot_expert_check", "cuda")
