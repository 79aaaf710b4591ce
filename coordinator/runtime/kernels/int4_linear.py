"""One decode token's attention projections read as 4-bit codes, through torch's tinygemm kernel
(`torch._weight_int4pack_mm`, CUDA), where the store quantizes attention at 4 bits.

Why: the engine dequantizes attention into the model's dtype at load, and a resident decode token
then reads those bf16 weights once per layer (Mixtral-8x7B: 2.7 GB a token, 0.84 ms on an H200).
tinygemm reads the codes: on an H200 (scripts/int4_projection_bench.py, 2026-12-01) Mixtral's qkv
[6144, 4096] took 8.6 us against bf16's 13.1, o [4096, 4096] 6.5 against 9.9 (~0.25 ms a token).
The prompt keeps the bf16 weights and one matmul (tinygemm is slow past a few tokens), so the
projections are held both ways (+0.56 bytes a weight).

The mapping, exact but for bf16 rounding: tinygemm computes w = (q - 8) * scale + zero with q the
4-bit code and a bf16 scale and zero per group of the input; an HQQ matrix is w = (c - z) * s, so
q = c, scale = s, zero = (8 - z) * s. The codes go in as bytes of two, the even column in the high
nibble (the order tinygemm's packing takes; the other order measured a relative error of 1.1 on
the GPU, this one 2.9e-3 against float64, bf16's own 2.3e-3). `reference_weight` is the weight
tinygemm multiplies, so the mapping is checked off the GPU (tests/test_int4_attention.py).

bf16 models only (tinygemm's activations), groups of 32-256, input width a multiple of
16 * INNER_K_TILES, output rows a multiple of 8. `MOE_EDGE_INT4_ATTENTION=0` keeps the bf16
projections for decode too, to compare.

Legend: N = output rows, K = input columns, G = group size."""

from __future__ import annotations

import torch

from common.quantization import QuantizedMatrix

SWITCH = "MOE_EDGE_INT4_ATTENTION"
GROUPS = (32, 64, 128, 256)  # the group sizes tinygemm takes
INNER_K_TILES = 4  # its packing's inner tiles: 2, 4 and 8 measured within 4% of one another on the H200


def supports(matrices: list[QuantizedMatrix], dtype: torch.dtype) -> bool:
    """4-bit single-plane codes, one group size tinygemm takes, the same input width, shapes its
    tiles divide, a bf16 model."""
    if dtype != torch.bfloat16 or not matrices:
        return False
    first = matrices[0]
    columns = first.shape[1]
    return all(m.bits == 4 and len(m.planes) == 1 and m.group_size == first.group_size and m.shape[1] == columns
               for m in matrices) and first.group_size in GROUPS and columns % (16 * INNER_K_TILES) == 0 \
        and sum(m.shape[0] for m in matrices) % 8 == 0


def tinygemm_operands(matrices: list[QuantizedMatrix]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `matrices` stacked, as tinygemm takes them before packing: codes [N, K / 2]
    uint8 (the even column in the high nibble) and scales_and_zeros [K / G, N, 2] bf16."""
    codes = torch.cat([m.codes() for m in matrices]).to(torch.int32)  # [N, K]
    scale = torch.cat([m.scale for m in matrices]).float()  # [N, K / G]
    zero = torch.cat([m.zero for m in matrices]).float()
    nibbles = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    scales_and_zeros = torch.stack([scale.T, ((8 - zero) * scale).T], dim=2).to(torch.bfloat16).contiguous()
    return nibbles, scales_and_zeros


def reference_weight(nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The [N, K] float32 weight tinygemm multiplies for these operands: (q - 8) * scale + zero."""
    rows = nibbles.shape[0]
    codes = torch.stack([nibbles >> 4, nibbles & 0xF], dim=2).view(rows, -1).float()  # [N, K]
    scale = scales_and_zeros[..., 0].float().T.repeat_interleave(group, dim=1)  # [N, K]
    zero = scales_and_zeros[..., 1].float().T.repeat_interleave(group, dim=1)
    return (codes - 8) * scale + zero


class Int4Linear:
    """x [T, K] bf16 (CUDA) -> x @ W.T [T, N] for the stacked rows of `matrices`, read as codes."""

    def __init__(self, matrices: list[QuantizedMatrix], device: torch.device) -> None:
        nibbles, scales_and_zeros = tinygemm_operands(matrices)
        self.group = matrices[0].group_size
        self.packed = torch._convert_weight_to_int4pack(nibbles.to(device), INNER_K_TILES)
        self.scales_and_zeros = scales_and_zeros.to(device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, self.packed, self.group, self.scales_and_zeros)
