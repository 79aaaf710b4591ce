"""The expert FFN: activation(x W13 + b13) W2 + b2, on plain, HQQ-quantized or MXFP4 weights. Mixtral's
is (SiLU(x W1) * (x W3)) W2 with no biases; GPT-OSS adds the biases and its clamped SwiGLU. The
biases and the activation come with the expert's weights (the blob layout), so they run here,
outside whichever `quantized` linear does the matmuls.

`linear` is the plain path: dequantize, then matmul. The coordinator passes its fused CUDA
kernels instead where it has them (coordinator/runtime/kernels); this path is their reference and what
the CPU runs. A `quantized` linear is given both kinds of quantized matrix (HQQ and MXFP4).

Shapes: T = tokens routed to this expert, H = hidden size, F = expert FFN width."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .mxfp4 import Mxfp4Matrix
from .quantization import QuantizedMatrix
from .store.blob_layout import ExpertWeights

Linear = Callable[[torch.Tensor, QuantizedMatrix | Mxfp4Matrix], torch.Tensor]


def dequantize_linear(x: torch.Tensor, weight: QuantizedMatrix | Mxfp4Matrix) -> torch.Tensor:
    return F.linear(x, weight.dequantize(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedMatrix | Mxfp4Matrix,
           quantized: Linear = dequantize_linear) -> torch.Tensor:
    """x [T, I] @ weight[O, I].T -> [T, O] in x's dtype."""
    if isinstance(weight, (QuantizedMatrix, Mxfp4Matrix)):
        return quantized(x, weight)
    return F.linear(x, weight.to(x.dtype))


def expert_forward(x: torch.Tensor, weights: ExpertWeights, quantized: Linear = dequantize_linear) -> torch.Tensor:
    """x [T, H] -> [T, H]."""
    gate_up = linear(x, weights.w13, quantized)  # [T, 2F]
    if weights.b13 is not None:
        gate_up = gate_up + weights.b13.to(x.dtype)
    out = linear(weights.activation(gate_up), weights.w2, quantized)  # [T, H]
    if weights.b2 is not None:
        out = out + weights.b2.to(x.dtype)
    return out
