"""Fast expert compute on CUDA: Triton kernels that read HQQ or MXFP4 codes straight from a cache slot.

`quantized_linear_for(device)` gives the engine the fused path where CUDA and Triton are
present; elsewhere (the CPU, CI) the plain dequantize+matmul of common.expert_ffn runs, which is
also the reference the kernels are tested against.

`slot_experts_for` gives the decoder, when every expert is resident, kernels that run a
token's top-k experts straight from their cache slots by device-side slot indices
(slot_experts.py), or None where they do not apply (then the decoder stages or runs directly);
MOE_EDGE_SLOT_KERNEL=v1|v2|v3|v4 picks the kernel's formulation (slot_experts.DEFAULT_VARIANT if unset).
`grouped_experts_for` gives the MoE block, for prompts while every expert is resident, a layer's
experts in two grouped launches with no routing read-back (grouped_prefill.py), or None;
MOE_EDGE_GROUPED_PREFILL=0 keeps the per-expert prompt path.

An HQQ matrix goes to quantized_linear.py, an MXFP4 matrix (GPT-OSS's experts as stored,
common/mxfp4.py) to mxfp4_linear.py: for a few tokens a fused GEMV on the packed codes, for more
a dequantize kernel and one matmul. On by default since it ran on an H200 (2026-12-01:
scripts/check_mxfp4_cuda.py gave the CPU's greedy tokens, and a GPT-OSS-120B cut decoded 3.5x
(lru+prefetch) to 5.7x (resident) faster than with the experts dequantized before a plain
matmul); MOE_EDGE_MXFP4_KERNEL=0 turns it off, for comparing the two. The biases and the activation between the
matrices stay in common.expert_ffn, whichever linear runs."""

from __future__ import annotations

import os

import torch

from common.expert_ffn import Linear, dequantize_linear
from common.mxfp4 import Mxfp4Matrix
from common.quantization import QuantizedMatrix


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def interpreted() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1: the tests off a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def switched_on(device: torch.device, switch: str) -> bool:
    """A fused path's condition: CUDA with Triton, and its environment switch not "0" (read now)."""
    return device.type == "cuda" and os.environ.get(switch, "1") != "0" and available()


def quantized_linear_for(device: torch.device, *, fused: bool = True) -> Linear:
    if fused and device.type == "cuda" and available():
        from .mxfp4_linear import mxfp4_linear
        from .quantized_linear import quantized_linear

        fused_mxfp4 = os.environ.get("MOE_EDGE_MXFP4_KERNEL", "1") != "0"  # 0: dequantize + matmul, to compare

        def fused_where_quantized(x: torch.Tensor, weight) -> torch.Tensor:
            if isinstance(weight, QuantizedMatrix):
                return quantized_linear(x, weight)
            if isinstance(weight, Mxfp4Matrix) and fused_mxfp4:
                return mxfp4_linear(x, weight)
            return dequantize_linear(x, weight)

        fused_where_quantized.fused = True  # the decoder's cue that fused kernels are wanted
        return fused_where_quantized
    return dequantize_linear


def slot_experts_for(device: torch.device, layout, top_k: int, dtype: torch.dtype):
    """A SlotExperts for this blob layout on CUDA with Triton, or None (another device, another
    layout: MXFP4, 3-bit, plain, biases, another activation, shapes off the block sizes)."""
    if device.type != "cuda" or not available() or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    from .slot_experts import DEFAULT_VARIANT, SlotExperts, supports

    variant = os.environ.get("MOE_EDGE_SLOT_KERNEL") or DEFAULT_VARIANT  # v1, v2, v3 or v4 (slot_experts.VARIANTS)
    return SlotExperts(layout, top_k, device, dtype, variant) if supports(layout) else None


GROUPED_PREFILL_SWITCH = "MOE_EDGE_GROUPED_PREFILL"  # here, so that checking it imports no Triton


def grouped_experts_for(device: torch.device, layout, dtype: torch.dtype, *, fused: bool = True):
    """A grouped_prefill.GroupedExperts for this layout on CUDA with Triton (and its switch on),
    or None (another device or layout, a float32 model, fused kernels off, no Triton)."""
    if not fused or not switched_on(device, GROUPED_PREFILL_SWITCH):
        return None
    from .grouped_prefill import GroupedExperts, supports

    return GroupedExperts(layout) if supports(layout, dtype) else None
