"""The expert FFN of Mixtral: (SiLU(x W1) * (x W3)) W2, on plain or HQQ-quantized weights.

Shapes: T = tokens routed to this expert, H = hidden size, F = expert FFN width."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantization import QuantizedMatrix
from .store.blob_layout import ExpertWeights

# A fused dequantize+matmul for CUDA registers itself here (coordinator.kernels); the plain
# path below is the reference it is tested against and what the CPU runs.
fused_linear = None


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedMatrix) -> torch.Tensor:
    """x [T, I] @ weight[O, I].T -> [T, O] in x's dtype."""
    if isinstance(weight, QuantizedMatrix):
        if fused_linear is not None and x.is_cuda:
            return fused_linear(x, weight)
        return F.linear(x, weight.dequantize(x.dtype))
    return F.linear(x, weight.to(x.dtype))


def expert_forward(x: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
    """x [T, H] -> [T, H]."""
    gate, up = linear(x, weights.w13).chunk(2, dim=-1)  # [T, F] each
    return linear(F.silu(gate) * up, weights.w2)
