"""The decode step's fused kernels (kernels/decode_fusion.py: residual add + RMSNorm, the softmax
router) against today's torch ops, under Triton's CPU interpreter here and for real on a GPU
(tests/decode_fusion_check.py says the bounds); and on a GPU, a resident decode through them
gives the greedy tokens of the torch ops (MOE_EDGE_FUSED_DECODE=0). The CPU's decode never runs
them."""

import pytest
import torch

from conftest import check_kernels, needs_triton, requires_cuda, run_module
from coordinator.runtime.engine import Engine
from test_resident_decode import decode


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernels here")
def test_fused_decode_kernels_match_the_torch_ops_in_the_cpu_interpreter():
    check_kernels("tests.decode_fusion_check", "cpu")


@requires_cuda
@needs_triton
def test_fused_decode_kernels_match_the_torch_ops_on_the_gpu():
    check_kernels("tests.decode_fusion_check", "cuda")


def test_the_cpu_decode_does_not_take_the_fused_kernels(store16):
    with Engine.open(store16, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        _, _, decoder = decode(engine, torch.device("cpu"), resident_path=True)
        assert decoder.fusion is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("store_name", ["store4", "store2"])
@pytest.mark.parametrize("resident_path", [True, False])
@requires_cuda
@needs_triton
def test_a_fused_decode_gives_the_torch_ops_tokens_on_cuda(request, monkeypatch, store_name, dtype, resident_path):
    """store4's shapes take the in-place slot kernels, store2's the staging copy; resident_path
    False the per-layer graphs (the fused router without the sorted outputs)."""
    store = request.getfixturevalue(store_name)
    with Engine.open(store, device="cuda", dtype=dtype, cache_experts=2) as engine, torch.inference_mode():
        engine.use_cache_mode("resident")
        monkeypatch.setenv("MOE_EDGE_FUSED_DECODE", "0")
        want, plain, decoder = decode(engine, torch.device("cuda"), resident_path=resident_path)
        assert decoder.fusion is None
        monkeypatch.delenv("MOE_EDGE_FUSED_DECODE")
        tokens, fused, decoder = decode(engine, torch.device("cuda"), resident_path=resident_path)
        assert decoder.fusion is not None and decoder.resident == resident_path
        assert tokens == want
        scale = plain.float().abs().max().item()
        assert (fused.float() - plain.float()).abs().max().item() < 5e-2 * scale


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_through_the_fused_kernels_gives_the_torch_ops_tokens_in_the_cpu_interpreter(store16, dtype):
    """The wiring (decoder.py, moe.py's route), with the kernels in the interpreter: the decoder
    made to take them on the CPU, resident and per-layer."""
    result = run_module("tests.decode_fusion_decode_check", store16, dtype, env_extra={"TRITON_INTERPRET": "1"},
                        timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_through_the_slot_kernels_and_their_fused_glue_gives_the_torch_ops_tokens_in_the_cpu_interpreter(
        store4, dtype):
    """The slot kernels forced on the CPU (store4's experts take them): the resident path with
    today's glue and with the fused one (the MoE norm writing the kernels' input, the next add +
    norm summing the w2 partials), its per-layer graphs, and the offloaded per-count path."""
    result = run_module("tests.decode_fusion_decode_check", store4, dtype, "slots",
                        env_extra={"TRITON_INTERPRET": "1"}, timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_triton
@pytest.mark.parametrize("hidden", [4096, 7168, 8192])
def test_add_rms_norm_compiles_for_sm90_in_one_program_without_spills(hidden):
    """What the interpreter cannot see: one program holds the whole row at Mixtral's (4096),
    DeepSeek's (7168) and the largest hidden size (8192) with nothing spilled to local memory,
    and the norm's square root and division are the rounded ones, not approximations."""
    import triton

    from coordinator.runtime.kernels import decode_fusion
    from test_kernels import _compile_for_sm90

    block = triton.next_power_of_2(hidden)
    rows = {name: ("*bf16", 0) for name in ("a_ptr", "b_ptr", "weight_ptr", "sum_ptr", "normed_ptr")}
    rows.update(x32_ptr=("*fp32", 0), x_sums_ptr=("*fp32", 0))
    # today's add + norm; with the slot kernels' float32 input and sums; summing 8 (Mixtral: k 2, split 4) or 32 partials
    for extra, b in (({}, "*bf16"), ({"X32": True}, "*bf16"), ({"PARTS": 8}, "*fp32"), ({"PARTS": 32}, "*fp32")):
        compiled = _compile_for_sm90(decode_fusion._add_rms_norm_kernel, dict(rows, b_ptr=(b, 0), eps=("fp32", 1e-5)),
                                     {"H": hidden, "BLOCK": block, "HAS_B": True, "PARTS": 0, "X32": False, "CHUNK": 16, **extra}, decode_fusion._warps(block))
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and ".local" not in ptx, extra
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx


@needs_triton
@pytest.mark.parametrize("bits", [2, 4])
def test_the_slot_w13_kernel_with_its_hidden_sums_compiles_for_sm90_without_spills(bits):
    """v1's w13 launch at Mixtral's shapes (H 4096, F 14336, group 64) at the module's block
    shapes, its epilogue summing the stored activations per 16 rows: nothing spilled."""
    from coordinator.runtime.kernels import slot_experts
    from test_kernels import _compile_for_sm90

    hidden, ffn, group = 4096, 14336, 64
    packed = hidden * bits // 8
    block_o, block_j, warps, unroll = slot_experts.default_shapes("v1")[0]
    assert block_o % 16 == 0
    pointers = dict(x_ptr="*fp32", x_sums_ptr="*fp32", memory_ptr="*u8", slot_ptr="*i64", route_ptr="*fp32",
                    out_ptr="*fp32", out_sums_ptr="*fp32")
    arguments = {name: (kind, 0) for name, kind in pointers.items()}
    arguments["SPLIT"] = ("i32", 1)
    codes = 0
    scale = codes + 2 * ffn * packed
    zero = scale + 2 * ffn * (hidden // group) * 2
    constants = dict(X_STRIDE=0, NBYTES=zero + 2 * ffn * (hidden // group) * 2, CODES=codes, SCALE=scale, ZERO=zero,
                     O=ffn, P=packed, NG=hidden // group, WIDTH=bits, GROUP=group, BLOCK_O=block_o,
                     BLOCK_J=block_j, GATED=True, ROUND=triton_bf16(), STREAM=False, PREFETCH=False,
                     UNROLL=unroll, OUT_SUMS=True)
    compiled = _compile_for_sm90(slot_experts._slot_gemv_kernel, arguments, constants, warps)
    assert compiled.asm["cubin"] and ".local" not in compiled.asm["ptx"]


def triton_bf16():
    import triton.language as tl

    return tl.bfloat16


@needs_triton
@pytest.mark.parametrize("experts, hidden, top_k", [(8, 4096, 2), (128, 2048, 8), (60, 3584, 4), (128, 4096, 8)])
def test_softmax_router_compiles_for_sm90_without_spills(experts, hidden, top_k):
    """Mixtral's, Qwen3-MoE's, Qwen2-MoE's router and a 128-expert one at H = 4096: one program
    over all experts, nothing spilled, the router's rows read 16 bytes a load."""
    import triton

    from coordinator.runtime.kernels import decode_fusion
    from test_kernels import _compile_for_sm90

    block_e, block_h = decode_fusion._router_blocks(experts, hidden)
    pointers = dict(x_ptr="*bf16", router_ptr="*bf16", weights_ptr="*fp32", experts_ptr="*i64",
                    sorted_experts_ptr="*i64", sorted_positions_ptr="*i64", sorted_weights_ptr="*fp32")
    compiled = _compile_for_sm90(decode_fusion._softmax_router_kernel,
                                 {name: (kind, 0) for name, kind in pointers.items()},
                                 {"H": hidden, "E": experts, "K": top_k, "BLOCK_E": block_e, "BLOCK_H": block_h,
                                  "BLOCK_K": triton.next_power_of_2(top_k), "NORMALIZE": True, "SORTED": True},
                                 decode_fusion._warps(block_e * block_h))
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and ".local" not in ptx
    assert "ld.global.v4" in ptx
