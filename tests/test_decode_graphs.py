"""The decode path (decoder.py: CUDA graphs on CUDA, the same steps run directly here) gives, token
by token, the logits the prompt path gives for the whole sequence at once, for several cache sizes
and quantized stores. test_matches_transformers.py checks both paths against transformers; on
CUDA, tests/test_cuda_engine.py checks captured graphs against the same steps run directly."""

import pytest
import torch

from conftest import requires_cuda
from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache

STEPS = 10


@pytest.mark.parametrize("store_name,cache_experts,prefetch", [("store16", 1, True), ("store16", 2, False), ("store4", 3, True)])
def test_decode_steps_give_the_prompt_paths_logits_and_tokens(request, store_name, cache_experts, prefetch):
    store = request.getfixturevalue(store_name)
    with Engine.open(store, cache_experts=cache_experts, prefetch=prefetch) as engine, torch.inference_mode():
        prompt = engine.encode("The quick brown fox")
        kv = KVCache(engine.config, 64, torch.device("cpu"), torch.float32)
        logits = engine._prefill(prompt, kv)
        tokens, stepped = list(prompt), []
        for _ in range(STEPS):
            tokens.append(int(logits[-1].argmax()))
            logits = engine._decode_step(tokens[-1], len(tokens) - 1, kv).clone()
            stepped.append(logits[0])
        whole = KVCache(engine.config, 64, torch.device("cpu"), torch.float32)
        at_once = engine.model.forward(torch.tensor(tokens), 0, whole, all_logits=True)[len(prompt):]  # [STEPS, V]
        assert (torch.stack(stepped) - at_once).abs().max().item() < 1e-4
        assert [int(row.argmax()) for row in stepped[:-1]] == tokens[len(prompt) + 1:]


@pytest.mark.parametrize("store_name", ["store16", "store4"])
def test_the_staged_expert_path_for_many_slots_gives_the_same_logits(request, store_name):
    """Past MAX_EXPERT_GRAPHS (layers x slots x top-k), each expert runs from a staging buffer that
    a device-side slot index fills: it must compute what the graph-per-slot path computes."""
    from coordinator.runtime.decoder import Decoder

    store = request.getfixturevalue(store_name)
    with Engine.open(store, cache_experts=3) as engine, torch.inference_mode():
        prompt = engine.encode("The quick brown fox")
        runs = []
        for max_graphs in (10_000, 0):  # per-slot graphs, then staged
            kv = KVCache(engine.config, 64, torch.device("cpu"), torch.float32)
            logits = engine._prefill(prompt, kv)
            decoder = Decoder(engine.model, kv, cuda_graphs=False, max_expert_graphs=max_graphs)
            assert decoder.staged == (max_graphs == 0)
            steps, position = [], len(prompt)
            for _ in range(STEPS):
                logits = decoder.step(int(logits[-1].argmax()), position).clone()
                steps.append(logits[0])
                position += 1
            runs.append(torch.stack(steps))
        assert (runs[0] - runs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@requires_cuda
def test_offloaded_decode_through_the_in_place_slot_kernels_gives_the_per_slot_graphs_tokens_on_cuda(store4, dtype):
    """K < E on CUDA: a layer's on-device experts through one per-count graph of the slot
    kernels (their slots and positions copied in per layer) against a graph per (slot, position)."""
    from coordinator.runtime.decoder import Decoder

    device = torch.device("cuda")
    with Engine.open(store4, device="cuda", dtype=dtype, cache_experts=2) as engine, torch.inference_mode():
        prompt = engine.encode("The quick brown fox")
        runs = []
        for slot_kernels in (False, True):
            kv = KVCache(engine.config, 64, device, engine.dtype)
            logits = engine._prefill(prompt, kv)
            decoder = Decoder(engine.model, kv, slot_kernels=slot_kernels)
            assert (decoder.counted_slot_experts is not None) == slot_kernels
            tokens, steps, position = [], [], len(prompt)
            for _ in range(STEPS):
                tokens.append(int(logits[-1].argmax()))
                logits = decoder.step(tokens[-1], position).clone()
                steps.append(logits[0].float())
                position += 1
            runs.append((tokens, torch.stack(steps)))
        (want, per_slot), (tokens, slotted) = runs
        assert tokens == want
        assert (slotted - per_slot).abs().max().item() < 5e-2 * per_slot.abs().max().item()
