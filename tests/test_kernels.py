"""The fused dequantize+matmul kernels compute what plain dequantize+matmul computes: relative
error under 1e-2 in fp16/bf16 on the GPU; the same kernels under Triton's CPU interpreter here, on
fewer and smaller shapes. Each run draws a fresh seed and prints it. The HQQ kernels are checked by
tests/kernel_check.py, the MXFP4 ones (and a GPT-OSS expert read through them from a blob) by
tests/mxfp4_kernel_check.py."""

import importlib.util

import pytest
import torch

from conftest import requires_cuda, run_module

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernels here")
def test_fused_kernels_match_dequantize_matmul_in_the_cpu_interpreter():
    # A process of its own: TRITON_INTERPRET is read when triton is imported.
    result = run_module("tests.kernel_check", "cpu", env_extra={"TRITON_INTERPRET": "1"}, timeout=600)
    print(result.stdout)  # its first line is the seed, to rerun a failure with
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


@requires_cuda
@needs_triton
def test_fused_kernels_match_dequantize_matmul_on_the_gpu():
    result = run_module("tests.kernel_check", "cuda", timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernels here")
def test_mxfp4_kernels_match_dequantize_matmul_in_the_cpu_interpreter():
    result = run_module("tests.mxfp4_kernel_check", "cpu", env_extra={"TRITON_INTERPRET": "1"}, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


@requires_cuda
@needs_triton
def test_mxfp4_kernels_match_dequantize_matmul_on_the_gpu():
    result = run_module("tests.mxfp4_kernel_check", "cuda", timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


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
    from common.mxfp4 import Mxfp4Matrix
    from common.quantization import QuantSpec, quantize_matrix
    from coordinator.runtime import kernels
    from coordinator.runtime.kernels import mxfp4_linear, quantized_linear

    calls = []
    monkeypatch.setattr(kernels, "available", lambda: True)  # as on a CUDA machine with Triton
    monkeypatch.setattr(mxfp4_linear, "mxfp4_linear", lambda x, weight: calls.append("mxfp4") or x)
    monkeypatch.setattr(quantized_linear, "quantized_linear", lambda x, weight: calls.append("hqq") or x)
    linear = kernels.quantized_linear_for(torch.device("cuda"))
    assert getattr(linear, "fused", False)
    x = torch.randn(1, 64)
    linear(x, Mxfp4Matrix(torch.zeros(8, 32, dtype=torch.uint8), torch.full((8, 2), 127, dtype=torch.uint8)))
    linear(x, quantize_matrix(torch.randn(8, 64), QuantSpec(4, 64)))
    assert calls == ["mxfp4", "hqq"]
    assert kernels.quantized_linear_for(torch.device("cuda"), fused=False) is kernels.dequantize_linear
