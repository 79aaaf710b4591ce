"""Every family against transformers itself: a tiny random checkpoint of each, made with the
family's own transformers config and model classes (fixed seed, routers spread so routing is no
near tie, experts large enough that a wrong one changes the output), packed unquantized, gives
transformers' logits for the prompt and each of 16 decode steps (float32, CPU) and the greedy
tokens of `generate(do_sample=False)`: with one slot per layer, with every expert cached, and
through an expert host. Quantized, it generates with a stated relative logit error."""

import pytest
import torch

from coordinator.runtime.engine import Engine
from expert_host_processes import expert_hosts  # noqa: F401 (a fixture)
from coordinator.runtime.model import KVCache

FAMILIES = ["qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "gpt_oss"]
PROMPT_TOKENS = 24
DECODE_STEPS = 16
SIZES = dict(num_layers=3, hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    from coordinator.tools.tiny_model import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("families") / request.param, family=request.param, seed=0, **SIZES)
    return request.param, folder


@pytest.fixture(scope="module")
def family_store(family_model, tmp_path_factory):
    from coordinator.tools.pack import pack_checkpoint

    family, folder = family_model
    out = tmp_path_factory.mktemp("family-stores") / family
    pack_checkpoint(model_dir=folder, out=out, expert_bits=16, dense_bits=16, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(family_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_model[1], dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # 16 tokens, as ours with stop_at_eos=False
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 300, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1234))


@torch.inference_mode()
def test_logits_match_transformers_for_the_prompt_and_each_decode_step(family_store, reference, prompt_ids):
    with Engine.open(family_store, cache_experts=2) as engine:
        kv = KVCache(engine.config, PROMPT_TOKENS + DECODE_STEPS, torch.device("cpu"), torch.float32)
        ours = engine.model.forward(prompt_ids, 0, kv, all_logits=True)  # the prompt path
        theirs = reference(prompt_ids[None], use_cache=True)
        assert (ours - theirs.logits[0]).abs().max().item() < 1e-4
        past, token, position = theirs.past_key_values, int(theirs.logits[0, -1].argmax()), PROMPT_TOKENS
        for _ in range(DECODE_STEPS):
            ours = engine._decode_step(token, position, kv)  # the decode path
            theirs = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            assert (ours[0] - theirs.logits[0, -1]).abs().max().item() < 1e-4
            past, token, position = theirs.past_key_values, int(theirs.logits[0, -1].argmax()), position + 1


@pytest.fixture(scope="module")
def expected_tokens(reference, prompt_ids):
    with torch.inference_mode():
        return reference.generate(prompt_ids[None], do_sample=False, max_new_tokens=DECODE_STEPS)[0, PROMPT_TOKENS:].tolist()


def greedy(store, **options) -> list[int]:
    with Engine.open(store, **options) as engine:
        generation = engine.generate(prompt_ids_list(), max_new_tokens=DECODE_STEPS, stop_at_eos=False)
        list(generation)
        return generation.token_ids


def prompt_ids_list() -> list[int]:
    return torch.randint(3, 300, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1234)).tolist()


@pytest.mark.parametrize("cache_experts,prefetch", [(1, False), (1, True), (8, True)], ids=["K=1", "K=1+prefetch", "all-cached"])
def test_greedy_tokens_equal_transformers_generate(family_store, expected_tokens, cache_experts, prefetch):
    assert greedy(family_store, cache_experts=cache_experts, prefetch=prefetch) == expected_tokens


def test_greedy_tokens_through_an_expert_host_equal_transformers(family_store, expected_tokens, expert_hosts):
    from coordinator.sources.expert_pool import ExpertPool
    from coordinator.sources.cluster_config import ClusterConfig
    from common.host_address import HostAddress

    host = expert_hosts.start(family_store)
    source = ExpertPool.source_factory(ClusterConfig(hosts=(HostAddress.parse(host.address),)))
    assert greedy(family_store, source=source, cache_experts=2) == expected_tokens


@pytest.fixture(scope="module")
def family_store4(family_model, tmp_path_factory):
    from coordinator.tools.pack import pack_checkpoint

    family, folder = family_model
    out = tmp_path_factory.mktemp("family-stores4") / family
    pack_checkpoint(model_dir=folder, out=out, expert_bits=4, dense_bits=16, group_size=32, progress=False)
    return out


@torch.inference_mode()
def test_a_4_bit_store_generates_within_the_stated_error(family_store4, reference, prompt_ids):
    with Engine.open(family_store4, cache_experts=2) as engine:
        kv = KVCache(engine.config, PROMPT_TOKENS + 1, torch.device("cpu"), torch.float32)
        ours = engine.model.forward(prompt_ids, 0, kv)[0]
        generation = engine.generate(prompt_ids.tolist(), max_new_tokens=4, stop_at_eos=False)
        list(generation)
    theirs = reference(prompt_ids[None]).logits[0, -1]
    error = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"relative L2 error of the last prompt logits, 4-bit experts: {error:.3f}")
    assert error < 0.6 and len(generation.token_ids) == 4
