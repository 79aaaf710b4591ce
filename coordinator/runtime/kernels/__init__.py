"""Fast expert compute on CUDA: Triton kernels that read HQQ codes straight from a cache slot.

`quantized_linear_for(device)` gives the engine the fused path where CUDA and Triton are
present; elsewhere (the CPU, CI) the plain dequantize+matmul of common.expert_ffn runs, which is
also the reference the kernels are tested against.

`slot_experts_for` gives the decoder, when every expert is resident, kernels that run a
token's top-k experts straight from their cache slots by device-side slot indices
(slot_experts.py), or None where they do not apply (then the decoder stages or runs directly).

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

        fused_where_hqq.fused = True  # the decoder's cue that fused kernels are wanted
        return fused_where_hqq
    return dequantize_linear


def slot_experts_for(device: torch.device, layout, top_k: int, dtype: torch.dtype):
    """A SlotExperts for this blob layout on CUDA with Triton, or None (another device, another
    layout: MXFP4, 3-bit, plain, biases, another activation, shapes off the block sizes)."""
    if device.type != "cuda" or not available() or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    from .slot_experts import SlotExperts, supports

    return SlotExperts(layout, top_k, device, dtype) if supports(layout) else None
