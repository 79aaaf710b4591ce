"""The fused prefill kernel (coordinator/runtime/kernels/prefill_matmul.py): its weights round
exactly as the dequantize kernel's, and its outputs lie within the float32-summation bound that
tests/prefill_kernel_check.py states (against float64 and against dequantize + F.linear); under
Triton's interpreter here, on the GPU in the twin. Also: which path quantized_linear takes
(MOE_EDGE_FUSED_PREFILL), what the kernel refuses, the config table, and what the interpreter
cannot see, the table's tiles compiled for sm_90 without a GPU."""

import re

import pytest
import torch

from conftest import check_kernels, needs_triton, requires_cuda


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernel here")
def test_prefill_kernel_matches_float64_and_dequantize_matmul_in_the_cpu_interpreter():
    check_kernels("tests.prefill_kernel_check", "cpu")


@requires_cuda
@needs_triton
def test_prefill_kernel_matches_float64_and_dequantize_matmul_on_the_gpu():
    check_kernels("tests.prefill_kernel_check", "cuda")


def _matrix(rows=8, columns=128, bits=4, group=64):
    from common.quantization import QuantSpec, quantize_matrix

    return quantize_matrix(torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)), QuantSpec(bits, group))


@needs_triton
@pytest.mark.parametrize("flag, tokens, dtype, path", [
    (None, 5, torch.bfloat16, "fused"),
    ("1", 64, torch.float16, "fused"),
    ("0", 5, torch.bfloat16, "dequantize"),
    (None, 5, torch.float32, "dequantize"),  # tl.dot would round float32 x to TF32
    (None, 4, torch.bfloat16, "gemv"),  # DECODE_MAX_TOKENS
])
def test_quantized_linear_takes_the_fused_kernel_past_decode_unless_switched_off(monkeypatch, flag, tokens, dtype, path):
    from coordinator.runtime.kernels import prefill_matmul
    from coordinator.runtime.kernels import quantized_linear as ql

    calls = []
    monkeypatch.setattr(prefill_matmul, "prefill_linear", lambda x, weight: calls.append("fused") or x[:, :8])
    monkeypatch.setattr(ql, "dequantize", lambda weight, dtype: calls.append("dequantize") or weight.dequantize(dtype))
    monkeypatch.setattr(ql, "gemv", lambda x, weight, out: calls.append("gemv"))
    if flag is None:
        monkeypatch.delenv("MOE_EDGE_FUSED_PREFILL", raising=False)
    else:
        monkeypatch.setenv("MOE_EDGE_FUSED_PREFILL", flag)
    ql.quantized_linear(torch.randn(tokens, 128).to(dtype), _matrix())
    assert set(calls) == {path}


@needs_triton
def test_the_fused_prefill_goes_only_where_it_measured_faster():
    from coordinator.runtime.kernels.prefill_matmul import pays

    class Shape:  # pays reads only the shape
        def __init__(self, rows, columns):
            self.shape = (rows, columns)

    w13, w2, qwen_w13 = Shape(28672, 4096), Shape(4096, 14336), Shape(1536, 2048)
    assert pays(16, w13) and pays(128, w13) and not pays(129, w13) and not pays(512, w13)
    assert not pays(16, w2) and not pays(128, w2)
    assert pays(16, qwen_w13) and pays(512, qwen_w13)


@needs_triton
def test_prefill_kernel_refuses_what_it_does_not_read():
    from common.quantization import QuantizedMatrix, QuantSpec, quantize_matrix
    from coordinator.runtime.kernels.prefill_matmul import supports

    four_bit = _matrix()
    assert supports(four_bit, torch.bfloat16) and supports(four_bit, torch.float16)
    assert supports(_matrix(bits=2, group=32), torch.bfloat16)
    assert not supports(four_bit, torch.float32)
    assert not supports(quantize_matrix(torch.randn(8, 128), QuantSpec(3, 64)), torch.bfloat16)  # two planes
    assert not supports(_matrix(columns=96, group=8), torch.bfloat16)  # K blocks under tl.dot's 16
    assert not supports(_matrix(columns=192, bits=2, group=64), torch.bfloat16)  # a plane of 48 bytes: groups straddle planes
    strided = QuantizedMatrix((four_bit.planes[0].T.contiguous().T,), four_bit.scale, four_bit.zero, 4, 64)
    assert not supports(strided, torch.bfloat16)


@needs_triton
def test_config_table_grows_the_token_block_narrows_small_grids_and_fits_the_group():
    from coordinator.runtime.kernels.prefill_matmul import MIN_PROGRAMS, prefill_config

    assert [prefill_config(t, 28672, 2, 64).block_m for t in (5, 16, 17, 64, 65, 512)] == [16, 16, 32, 64, 128, 128]
    assert prefill_config(512, 28672, 2, 64).block_n == 128  # 4 x 224 programs
    assert prefill_config(128, 28672, 2, 64).block_n == 128  # 224 programs: not narrowed (the H200's best there)
    small = prefill_config(128, 1536, 4, 64)  # Qwen3-30B-A3B's w13: 12 output blocks of 128
    assert small.swap_ab and small.block_n == 64 and 1536 // 64 < MIN_PROGRAMS  # wgmma's M: no narrower
    assert small.num_warps == 4  # one warpgroup for 64 rows
    assert prefill_config(512, 28672, 4, 32).block_k == 32  # 64 fitted down to the group


def _compile_for_sm90(constants: dict, num_warps: int, num_stages: int):
    """The prefill kernel compiled for an H100/H200 (sm_90) with no GPU here, specialised as a
    launch at Mixtral's w13 would be: pointers and sizes divisible by 16, T unspecialised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from coordinator.runtime.kernels.prefill_matmul import _prefill_kernel

    kinds = dict(x_ptr="*bf16", codes_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16", out_ptr="*bf16")
    signature, attributes = {}, {}
    for index, name in enumerate(_prefill_kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        else:
            signature[name] = kinds.get(name, "i32")
            if name != "T":
                attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(_prefill_kernel, signature, constants, attributes)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


@needs_triton
@pytest.mark.parametrize("bits", [2, 4])
def test_the_tables_tiles_compile_for_sm90_to_wgmma_without_integer_conversions(bits):
    """What the interpreter cannot see: every tile of the table lowers to sm_90 code that uses
    wgmma (the tensor cores' Hopper instruction; mma.sync would be the older, slower one), turns
    codes into floats by the bit trick (no cvt from an integer), and fits the 227 KB of shared
    memory a block may have, at Mixtral's w13 and at Qwen3-30B-A3B's narrower grids. Whether it
    is fast is scripts/prefill_kernel_bench.py's question."""
    from coordinator.runtime.kernels.prefill_matmul import CONFIG_TABLE, prefill_config

    tiles = {prefill_config(min(most, 512), rows, bits, 64) for most, _, _ in CONFIG_TABLE for rows in (28672, 1536)}
    for config in sorted(tiles, key=lambda c: c.label()):
        compiled = _compile_for_sm90(dict(WIDTH=bits, GROUP=64, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                                          BLOCK_K=config.block_k, SWAP_AB=config.swap_ab, DOT_IN_FP32=False),
                                     config.num_warps, config.num_stages)
        ptx = compiled.asm["ptx"]
        assert "wgmma.mma_async" in ptx, config
        assert not re.search(r"cvt\.rn\.f32\.[su]32", ptx), config
        assert compiled.metadata.shared <= 227 * 1024, (config, compiled.metadata.shared)
