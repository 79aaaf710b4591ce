"""The reference is transformers itself: our engine, unquantized in float32 on the CPU, gives
MixtralForCausalLM's logits and greedy tokens on the same tiny checkpoint."""

import pytest
import torch

from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache

PROMPT_TOKENS = 32
DECODE_STEPS = 16


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids():
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, 500, (PROMPT_TOKENS,), generator=generator)


@torch.inference_mode()
def test_logits_match_transformers_for_prompt_and_each_decode_step(store16, reference, prompt_ids):
    with Engine.open(store16, cache_experts=2) as engine:
        kv = KVCache(engine.config, PROMPT_TOKENS + DECODE_STEPS, torch.device("cpu"), torch.float32)
        ours = engine.model.forward(prompt_ids, 0, kv, all_logits=True)  # the prompt path
        theirs = reference(prompt_ids[None], use_cache=True)
        assert (ours - theirs.logits[0]).abs().max().item() < 1e-4
        past, token, position = theirs.past_key_values, int(theirs.logits[0, -1].argmax()), PROMPT_TOKENS
        for _ in range(DECODE_STEPS):
            ours = engine._decode_step(token, position, kv)  # the decode path (decoder.py)
            theirs = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            assert (ours[0] - theirs.logits[0, -1]).abs().max().item() < 1e-4
            past, token, position = theirs.past_key_values, int(theirs.logits[0, -1].argmax()), position + 1


@torch.inference_mode()
def test_greedy_tokens_equal_transformers_generate(store16, reference, prompt_ids):
    expected = reference.generate(prompt_ids[None], do_sample=False, max_new_tokens=DECODE_STEPS)[0, PROMPT_TOKENS:]
    with Engine.open(store16, cache_experts=2) as engine:
        generation = engine.generate(prompt_ids.tolist(), max_new_tokens=DECODE_STEPS)
        list(generation)
    assert generation.token_ids == expected.tolist()


@torch.inference_mode()
def test_greedy_text_equals_transformers_for_a_text_prompt(store16, reference, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("The experts live in host memory", return_tensors="pt").input_ids
    expected = reference.generate(ids, do_sample=False, max_new_tokens=12)[0, ids.shape[1]:]
    with Engine.open(store16, cache_experts=3) as engine:
        generation = engine.generate("The experts live in host memory", max_new_tokens=12)
        text = "".join(generation)
    assert generation.token_ids == expected.tolist()[: len(generation.token_ids)]
    assert text == tokenizer.decode(generation.token_ids, skip_special_tokens=True)
