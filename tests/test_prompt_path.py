"""The prompt path (issue 11): all of a prompt's tokens go through each layer at once (routing
every token, each expert once on all its tokens, fused attention), in chunks of --prompt-chunk.
Its logits must match transformers' and token-by-token processing; chunking changes nothing."""

import pytest
import torch

from common.errors import ConfigError
from coordinator.runtime.engine import Engine
from coordinator.runtime.engine_options import EngineOptions
from coordinator.runtime.model import KVCache

PROMPT_TOKENS = 24


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 500, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def reference_logits(tiny_model_dir, prompt_ids):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        return model(prompt_ids[None]).logits[0]  # [T, V]


@torch.inference_mode()
def test_batched_prompt_matches_transformers_and_token_by_token(store16, prompt_ids, reference_logits):
    with Engine.open(store16, cache_experts=2) as engine:
        kv = KVCache(engine.config, PROMPT_TOKENS, torch.device("cpu"), torch.float32)
        batched = engine.model.forward(prompt_ids, 0, kv, all_logits=True)  # [T, V]
        assert (batched - reference_logits).abs().max().item() < 1e-4
        kv = KVCache(engine.config, PROMPT_TOKENS, torch.device("cpu"), torch.float32)
        one_by_one = torch.cat([engine.model.forward(prompt_ids[t:t + 1], t, kv, all_logits=True)
                                for t in range(PROMPT_TOKENS)])
        assert (one_by_one - batched).abs().max().item() < 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("chunk", [1, 5, PROMPT_TOKENS])
def test_chunked_prompt_gives_the_same_greedy_tokens(store16, prompt_ids, chunk):
    with Engine.open(store16, cache_experts=2) as whole:
        expected = whole.generate(prompt_ids.tolist(), max_new_tokens=8)
        list(expected)
    with Engine.open(store16, cache_experts=2, prompt_chunk=chunk) as chunked:
        got = chunked.generate(prompt_ids.tolist(), max_new_tokens=8)
        list(got)
    assert got.token_ids == expected.token_ids


def test_prompt_chunk_below_one_is_refused():
    with pytest.raises(ConfigError, match="--prompt-chunk 0"):
        EngineOptions(prompt_chunk=0)
