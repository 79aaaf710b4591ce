"""The fused dequantize+matmul kernels compute what plain dequantize+matmul computes: relative
error under 1e-2 in fp16/bf16 on the GPU; the same kernels under Triton's CPU interpreter here, on
fewer and smaller shapes. Each run draws a fresh seed and prints it. The HQQ kernels are checked by
tests/kernel_check.py, the MXFP4 ones (and a GPT-OSS expert read through them from a blob) by
tests/mxfp4_kernel_check.py."""

import pytest
import torch

from conftest import check_kernels, needs_triton, requires_cuda


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernels here")
def test_fused_kernels_match_dequantize_matmul_in_the_cpu_interpreter():
    check_kernels("tests.kernel_check", "cpu")


@requires_cuda
@needs_triton
def test_fused_kernels_match_dequantize_matmul_on_the_gpu():
    check_kernels("tests.kernel_check", "cuda")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernels here")
def test_mxfp4_kernels_match_dequantize_matmul_in_the_cpu_interpreter():
    check_kernels("tests.mxfp4_kernel_check", "cpu")


@requires_cuda
@needs_triton
def test_mxfp4_kernels_match_dequantize_matmul_on_the_gpu():
    check_kernels("tests.mxfp4_kernel_check", "cuda")


@needs_triton
def test_mxfp4_kernel_reads_blob_views_and_leaves_unaligned_codes_to_the_plain_path():
    from common.mxfp4 import Mxfp4Matrix
    from coordinator.runtime.kernels.mxfp4_linear import mxfp4_linear, supports

    rows, columns = 6, 64
    buffer = torch.randint(0, 256, (2 + rows * columns // 2 + 256,), dtype=torch.uint8)
    scales = torch.full((rows, columns // 32), 120, dtype=torch.uint8)
    aligned = Mxfp4Matrix(buffer[: rows * columns // 2].view(rows, -1), scales)
    unaligned = Mxfp4Matrix(buffer[2 : 2 + rows * columns // 2].view(rows, -1), scales)  # not readable as int32 words
    assert supports(aligned) and supports(aligned.rows(slice(1, None)))
    assert not supports(unaligned)
    assert not supports(Mxfp4Matrix(aligned.codes, scales[:, :1]))  # scales of another shape
    assert not supports(Mxfp4Matrix(aligned.codes.T, scales))  # columns not of unit stride
    x = torch.randn(2, columns)
    torch.testing.assert_close(mxfp4_linear(x, unaligned), x @ unaligned.dequantize(torch.float32).T)  # no kernel launched


@needs_triton
def test_the_fused_path_sends_mxfp4_matrices_to_the_mxfp4_kernels(monkeypatch):
    """By default (the kernels ran on an H200); with MOE_EDGE_MXFP4_KERNEL=0 an MXFP4 matrix is
    dequantized and multiplied instead."""
    from common.mxfp4 import Mxfp4Matrix
    from common.quantization import QuantSpec, quantize_matrix
    from coordinator.runtime import kernels
    from coordinator.runtime.kernels import mxfp4_linear, quantized_linear

    calls = []
    monkeypatch.setattr(kernels, "available", lambda: True)  # as on a CUDA machine with Triton
    monkeypatch.setattr(mxfp4_linear, "mxfp4_linear", lambda x, weight: calls.append("mxfp4") or x)
    monkeypatch.setattr(quantized_linear, "quantized_linear", lambda x, weight: calls.append("hqq") or x)
    x = torch.randn(1, 64)
    mxfp4 = Mxfp4Matrix(torch.zeros(8, 32, dtype=torch.uint8), torch.full((8, 2), 127, dtype=torch.uint8))
    monkeypatch.setenv("MOE_EDGE_MXFP4_KERNEL", "0")
    kernels.quantized_linear_for(torch.device("cuda"))(x, mxfp4)
    assert calls == []  # switched off: dequantized, not the kernel
    monkeypatch.delenv("MOE_EDGE_MXFP4_KERNEL")
    linear = kernels.quantized_linear_for(torch.device("cuda"))
    assert getattr(linear, "fused", False)
    linear(x, mxfp4)
    linear(x, quantize_matrix(torch.randn(8, 64), QuantSpec(4, 64)))
    assert calls == ["mxfp4", "hqq"]
    assert kernels.quantized_linear_for(torch.device("cuda"), fused=False) is kernels.dequantize_linear


def _compile_for_sm90(kernel, arguments: dict, constants: dict, num_warps: int):
    """`kernel` compiled for an H100/H200 (sm_90) with no GPU here, specialised as a launch with
    `arguments` (name -> (Triton type, value)) would be: pointers and multiples of 16 marked
    divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attributes = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        kind, value = arguments[name]
        signature[name] = kind
        if kind.startswith("*") or value % 16 == 0:
            attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constants, attributes)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@needs_triton
def test_mxfp4_kernels_compile_for_sm90_with_16_byte_loads_and_subnormals_kept():
    """What the interpreter cannot see: the kernels lower to sm_90 code (Triton's own ptxas), the
    GEMV loads its codes 16 bytes an instruction at GPT-OSS's w13 shape, and no float multiply
    flushes subnormals (the e2m1 decode relies on them)."""
    from coordinator.runtime.kernels import mxfp4_linear as kernels

    rows, blocks = 5760, 90  # w13 [5760, 2880]: 90 scale blocks a row
    gemv = _compile_for_sm90(kernels._gemv_kernel, dict(
        x_ptr=("*bf16", 0), words_ptr=("*i32", 0), scales_ptr=("*u8", 0), out_ptr=("*bf16", 0), O=("i32", rows),
        NB=("i32", blocks), x_stride=("i32", 2880), codes_block_stride=("i32", blocks), scales_stride=("i32", blocks),
        out_stride=("i32", rows)), {"BLOCK_O": 16, "BLOCK_W": kernels.GEMV_BLOCK_W}, 4)
    dequantize = _compile_for_sm90(kernels._dequantize_kernel, dict(
        codes_ptr=("*u8", 0), scales_ptr=("*u8", 0), out_ptr=("*bf16", 0), O=("i32", rows), NB=("i32", blocks),
        codes_block_stride=("i32", blocks), scales_stride=("i32", blocks), out_stride=("i32", 2880)),
        {"BLOCK_O": kernels.DEQUANTIZE_BLOCK_O, "BLOCK_J": kernels.DEQUANTIZE_BLOCK_J}, kernels.DEQUANTIZE_WARPS)
    for compiled in (gemv, dequantize):
        assert compiled.asm["cubin"]
        assert ".ftz" not in compiled.asm["ptx"]
    assert "ld.global.v4.b32" in gemv.asm["ptx"]
