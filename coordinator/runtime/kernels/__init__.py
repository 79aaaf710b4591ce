"""Fast expert compute on CUDA: Triton kernels that read HQQ codes straight from a cache slot.

`quantized_linear_for(device)` gives the engine the fused path where CUDA and Triton are
present; elsewhere (the CPU, CI) the plain dequantize+matmul of common.expert_ffn runs, which is
also the reference the kernels are tested against."""

from __future__ import annotations

import torch

from common.expert_ffn import Linear, dequantize_linear


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def quantized_linear_for(device: torch.device, *, fused: bool = True) -> Linear:
    if fused and device.type == "cuda" and available():
        from .quantized_linear import quantized_linear

        return quantized_linear
    return dequantize_linear
