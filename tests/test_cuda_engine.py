"""On a CUDA GPU (skipped without one): the float32 unquantized store gives the CPU's greedy
tokens; quantized stores run in float16 and bfloat16; the fused kernels change no greedy token.
Their CPU twins are test_offload_invariance.py and test_quantized_stores.py."""

import pytest
import torch

from conftest import requires_cuda
from coordinator.runtime.engine import Engine

pytestmark = requires_cuda
PROMPT = "A small cache on the graphics card keeps the experts"


def tokens(store, **options) -> list[int]:
    with Engine.open(store, **options) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
        list(generation)
        return generation.token_ids


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("cache_experts,prefetch", [(1, False), (2, True), (8, True)])
def test_float32_on_cuda_gives_the_cpu_greedy_tokens(store16, cache_experts, prefetch):
    cpu = tokens(store16, device="cpu", dtype="float32", cache_experts=8)
    assert tokens(store16, device="cuda", dtype="float32", cache_experts=cache_experts, prefetch=prefetch) == cpu


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("store_name", ["store4", "store2"])
def test_quantized_store_generates_in_half_precision_on_cuda(request, store_name, dtype):
    store = request.getfixturevalue(store_name)
    first = tokens(store, device="cuda", dtype=dtype, cache_experts=2)
    assert len(first) == 16
    assert tokens(store, device="cuda", dtype=dtype, cache_experts=8, source="disk") == first


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_kernels_change_no_greedy_token(store4, dtype, monkeypatch):
    from coordinator.runtime import kernels
    from coordinator.runtime.kernels import int4_linear

    assert kernels.available()
    # the expert kernels alone: the 4-bit attention projections round their weights otherwise
    # than the bf16 ones (a stated bound, not equal tokens: tests/test_int4_attention.py)
    monkeypatch.setenv(int4_linear.SWITCH, "0")
    fused = tokens(store4, device="cuda", dtype=dtype, cache_experts=2)
    plain = tokens(store4, device="cuda", dtype=dtype, cache_experts=2, fused_kernels=False)
    assert fused == plain


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("store_name", ["store16", "store4"])
def test_cuda_graphs_change_no_greedy_token(request, store_name, dtype):
    store = request.getfixturevalue(store_name)
    graphed = tokens(store, device="cuda", dtype=dtype, cache_experts=2)
    eager = tokens(store, device="cuda", dtype=dtype, cache_experts=2, cuda_graphs=False)
    assert graphed == eager


@pytest.mark.parametrize("placement", ["run", "auto"])
def test_placements_on_cuda_give_the_cpu_greedy_tokens(store16, placement):
    """Misses run on this CPU from the decode's own thread (or copied, under auto) while the GPU
    computes the hits. CPU twin: test_placement.py's greedy tests."""
    cpu = tokens(store16, device="cpu", dtype="float32", cache_experts=8)
    assert tokens(store16, device="cuda", dtype="float32", cache_experts=2, placement=placement) == cpu


def test_experts_run_on_a_local_host_from_the_cuda_decode_give_the_cpu_greedy_tokens(store16):
    """--local-host with placement run: RunExperts sent from the decode's thread over the host's
    Unix socket, its fetches read from shared memory pinned for the GPU. CPU twin: the same in
    test_placement.py with expert hosts."""
    from coordinator.sources.cluster_config import ClusterConfig
    from coordinator.sources.expert_pool import ExpertPool
    from coordinator.sources.local_host import LocalHost

    cpu = tokens(store16, device="cpu", dtype="float32", cache_experts=8)
    host = LocalHost(store16)
    try:
        host.start(startup_timeout_s=120)
        source = host.source_over(ExpertPool.source_factory(ClusterConfig(hosts=(host.address,))), pin=True)
        with Engine.open(store16, source=source, device="cuda", dtype="float32", cache_experts=2, placement="run") as engine:
            generation = engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
            list(generation)
            assert generation.token_ids == cpu
            assert generation.stats.experts_run_elsewhere > 0
            assert any(h.client.blocking_run_stream_open for h in engine.source.pool._hosts)
    finally:
        host.stop()
