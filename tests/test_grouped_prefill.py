"""The grouped prompt step (kernels/grouped_prefill.py, moe.MoEBlock's resident prompt path): its
kernels against float64 and the per-expert path (tests/grouped_prefill_check.py: under Triton's
interpreter here, for real on a GPU), its wiring in a bf16 engine under the interpreter, and when
the MoE block takes it: only with every expert resident and nothing needing the routing on the
host."""

import pytest
import torch

from conftest import check_kernels, needs_triton, requires_cuda, run_module
from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernel here")
def test_grouped_kernels_match_float64_and_the_per_expert_path_in_the_cpu_interpreter():
    check_kernels("tests.grouped_prefill_check", "cpu")


@requires_cuda
@needs_triton
def test_grouped_kernels_match_float64_and_the_per_expert_path_on_the_gpu():
    check_kernels("tests.grouped_prefill_check", "cuda")


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def family_store4(request, tmp_path_factory):
    """A tiny store of a family the grouped step meets beyond Mixtral: Qwen3-MoE (dense first
    layer, renormalised top-k) and Qwen2-MoE (a gated shared expert its output adds to); 4-bit,
    group 64, planes of whole groups (grouped_prefill.supports)."""
    from coordinator.tools.pack import pack_checkpoint
    from coordinator.tools.tiny_model import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("grouped") / request.param, family=request.param, seed=0,
                             num_layers=3, hidden_size=128, intermediate_size=128)
    out = tmp_path_factory.mktemp("grouped-stores") / request.param
    pack_checkpoint(model_dir=folder, out=out, expert_bits=4, dense_bits=16, progress=False)
    return out


def _prompt_check(store) -> None:
    result = run_module("tests.grouped_prefill_check", "prompt", str(store),
                        env_extra={"TRITON_INTERPRET": "1"}, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ") == 2


@needs_triton
def test_a_resident_prompt_through_the_grouped_step_gives_the_per_expert_paths_token_and_hits(store4):
    _prompt_check(store4)


@needs_triton
def test_the_same_for_qwen3_and_qwen2_moe_shapes(family_store4):
    _prompt_check(family_store4)


class _Grouped:
    """Stands in for GroupedExperts: records that it ran, and returns what it does (the experts
    with a row)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, experts, weights, memory, slots, out) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(experts.unique().numel())

    def pays(self, rows: int, num_experts: int) -> bool:
        return True


def test_the_grouped_step_pays_with_many_experts_or_few_rows_an_expert():
    from coordinator.runtime.kernels import grouped_prefill

    most, many = grouped_prefill.MOST_ROWS, grouped_prefill.MANY_EXPERTS
    assert grouped_prefill.pays(8 * most, 8) and not grouped_prefill.pays(8 * most + 1, 8)
    assert grouped_prefill.pays(1000 * many, many)  # many experts: always


def test_the_moe_block_takes_the_grouped_step_only_with_every_expert_resident_and_no_read_back_needed(store4):
    with Engine.open(store4, cache_experts=2) as engine, torch.inference_mode():
        assert engine.moe.grouped is None  # off CUDA
        layer = engine.config.moe_layers[0]
        engine.moe.grouped = _Grouped()
        assert engine.moe._resident_slots(layer) is None  # K = 2 of 8
        engine.use_cache_mode("resident")
        moe = engine.moe
        moe.grouped = _Grouped()
        slots = moe._resident_slots(layer)
        assert slots is not None and sorted(slots.tolist()) == list(range(engine.config.num_experts))
        engine._prefill(engine.encode("The quick brown fox"), KVCache(engine.config, 64, engine.device, engine.dtype))
        assert moe.grouped.calls == len(engine.config.moe_layers)
        moe.routing_hook = object()  # a trace records or replays read-backs
        assert moe._resident_slots(layer) is None
        moe.routing_hook, moe.elsewhere = None, object()  # experts run where they live
        assert moe._resident_slots(layer) is None
        moe.elsewhere = None
        engine.cache._evict(layer, 0)  # a slot emptied: no longer all resident
        assert moe._resident_slots(layer) is None
