"""Running an expert on the CPU at memory speed: the executor that both the coordinator (experts
in its RAM) and an expert host (experts it holds) use to run an expert where it lives.

At load, each HQQ-quantized matrix of the expert (2, 3 or 4-bit codes, planar bit planes, an fp16
scale and zero per group: common/quantization.py) is repacked, exactly, for torch's int4
weight-only matmul (`torch._weight_int4pack_mm_for_cpu`), which reads the packed codes once per
call. The two formulas agree term by term: HQQ's w = (q - z) * s is torch's (q - 8) * s + z' with
z' = (8 - z) * s, and codes of fewer than 4 bits are 4-bit codes that leave the top bits zero.
An unquantized expert keeps its matrices in the compute dtype and uses a plain matmul; so does an
MXFP4 one (common/mxfp4.py), dequantized at load: torch has no CPU matmul that reads e2m1 codes.

Knows nothing of caches, sources or the network: an ExpertWeights view in, a module out.

Shapes: T = tokens routed to the expert, H = hidden size, F = expert FFN width, G = groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mxfp4 import Mxfp4Matrix
from .quantization import QuantizedMatrix
from .store.blob_layout import ExpertWeights

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's packed int4 kernel takes


class Int4Matrix:
    """One [O, I] HQQ matrix repacked for torch's CPU int4 weight-only matmul."""

    def __init__(self, matrix: QuantizedMatrix, dtype: torch.dtype) -> None:
        self.group_size = matrix.group_size
        self.dtype = dtype
        codes = matrix.codes().to(torch.int32)  # [O, I], each < 2**bits <= 16
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)  # [O, I / 2] uint8
        scale, zero = matrix.scale.float(), matrix.zero.float()  # [O, G]
        # [G, O, 2]: per group and output row, torch's (scale, zero) for w = (q - 8) * scale + zero
        self.scale_and_zero = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1).to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, I] -> [T, O] in the compute dtype."""
        return torch._weight_int4pack_mm_for_cpu(x.to(self.dtype), self.packed, self.group_size, self.scale_and_zero)

    @property
    def nbytes(self) -> int:
        """Bytes a call reads: the packed codes and the scales and zeros."""
        return self.packed.numel() + self.scale_and_zero.numel() * self.scale_and_zero.element_size()


class PlainMatrix:
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def can_run_int4(matrix: QuantizedMatrix) -> bool:
    out_features, in_features = matrix.shape
    return matrix.bits <= 4 and matrix.group_size in INT4_GROUP_SIZES and in_features % matrix.group_size == 0


class CpuExpert:
    """One expert's FFN, activation(x W13 + b13) W2 + b2 (Mixtral's: SiLU(x W1) * (x W3), no
    biases; the activation and biases come with the weights, as in common/expert_ffn.py), ready
    to run on the CPU."""

    def __init__(self, weights: ExpertWeights, *, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.w13 = self._matrix(weights.w13)  # [2F, H]: gate and up
        self.w2 = self._matrix(weights.w2)  # [H, F]
        self.b13 = None if weights.b13 is None else weights.b13.to(dtype)  # [2F]
        self.b2 = None if weights.b2 is None else weights.b2.to(dtype)  # [H]
        self.activation = weights.activation

    def _matrix(self, weight) -> Int4Matrix | PlainMatrix:
        if isinstance(weight, QuantizedMatrix):
            if can_run_int4(weight):
                return Int4Matrix(weight, self.dtype)
            return PlainMatrix(weight.dequantize(torch.float32), self.dtype)  # a group size torch's kernel lacks
        if isinstance(weight, Mxfp4Matrix):
            return PlainMatrix(weight.dequantize(torch.float32), self.dtype)
        return PlainMatrix(weight, self.dtype)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in the compute dtype."""
        gate_up = self.w13(x)  # [T, 2F]
        if self.b13 is not None:
            gate_up = gate_up + self.b13
        out = self.w2(self.activation(gate_up))  # [T, H]
        return out if self.b2 is None else out + self.b2

    @property
    def nbytes(self) -> int:
        """Bytes one call reads (what memory bandwidth bounds)."""
        return self.w13.nbytes + self.w2.nbytes


def run_experts(x: torch.Tensor, experts: list[CpuExpert], weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of several experts on the same tokens: x [T, H], weights [T, n] -> [T, H]
    float32 (what one RunExpert call per layer returns)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for n, expert in enumerate(experts):
        out += expert(x).float() * weights[:, n : n + 1].float()
    return out
