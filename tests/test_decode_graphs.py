"""The graphed decode step computes what the eager step computes. On CUDA it replays graphs
(tests/test_cuda_engine.py); here, its CPU twin runs the very same steps without capture."""

import pytest
import torch

from coordinator.runtime.decoder import GraphedDecoder
from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache


@pytest.mark.parametrize("store_name,cache_experts,prefetch", [("store16", 1, True), ("store16", 2, False), ("store4", 3, True)])
def test_static_decode_steps_give_the_eager_logits_and_tokens(request, store_name, cache_experts, prefetch):
    store = request.getfixturevalue(store_name)
    with Engine.open(store, cache_experts=cache_experts, prefetch=prefetch) as engine, torch.inference_mode():
        prompt = torch.tensor(engine.encode("The quick brown fox"))
        eager_kv = KVCache(engine.config, 64, torch.device("cpu"), torch.float32)
        static_kv = KVCache(engine.config, 64, torch.device("cpu"), torch.float32)
        eager = engine.model.forward(prompt, 0, eager_kv)
        static = engine.model.forward(prompt, 0, static_kv)
        decoder = GraphedDecoder(engine.model, static_kv)
        position = prompt.numel()
        for _ in range(10):
            token = int(eager[-1].argmax())
            eager = engine.model.forward(torch.tensor([token]), position, eager_kv)
            static = decoder.step(int(static[-1].argmax()), position)
            assert (eager - static).abs().max().item() < 1e-5
            position += 1
