"""The fused dequantize+matmul kernels compute what plain dequantize+matmul computes: relative
error under 1e-2 in fp16/bf16 on the GPU; the same kernels under Triton's CPU interpreter here, on
fewer and smaller shapes. Each run draws a fresh seed and prints it."""

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
