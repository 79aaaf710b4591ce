"""Fast expert compute on CUDA: Triton kernels that read HQQ codes straight from a cache slot.

`quantized_linear_for(device)` gives the engine the fused path where CUDA and Triton are
present; elsewhere (the CPU, CI) the plain dequantize+matmul of common.expert_ffn runs, which is
also the reference the kernels are tested against.

The kernels read HQQ codes only: an MXFP4 matrix (GPT-OSS's experts as stored, common/mxfp4.py)
is dequantized and multiplied on the device by the plain path. A fused MXFP4 kernel is not
written yet."""

from __future__ import annotations

import torch

from common.expert_ffn import Linear, dequantize_linear
from common.quantization import QuantizedMatrix


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def quantized_linear_for(device: torch.device, *, fused: bool = True) -> Linear:
    if fused and device.type == "cuda" and available():
        from .quantized_linear import quantized_linear

        def fused_where_hqq(x: torch.Tensor, weight) -> torch.Tensor:
            if isinstance(weight, QuantizedMatrix):
                return quantized_linear(x, weight)
            return dequantize_linear(x, weight)  # MXFP4: no fused kernel yet

        return fused_where_hqq
    return dequantize_linear
