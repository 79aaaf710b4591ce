"""x @ W.T for an HQQ-quantized W kept in our planar bit-plane layout (common/quantization.py).

Decode (few tokens): one fused kernel reads the packed codes once, dequantizes in registers and
accumulates in float32; per group it uses
    sum_i W[o,i] x[i] = scale[o,g] * (sum_i code[o,i] x[i] - zero[o,g] * sum_i x[i]),
so the zero point costs one multiply per group, not per weight. The bytes it must read are the
codes plus the scales and zeros: 2.5 bits per weight at 2-bit, group 64.
Prefill (many tokens): one fused kernel (prefill_matmul.py) dequantizes tiles of the codes in
registers and feeds them to the tensor cores, so the 16-bit weight never reaches memory; each
weight rounds exactly as the dequantize kernel's, only the order of summation differs from
dequantize + F.linear. It takes 16-bit x (bf16, fp16) on single-plane 2/4-bit codes
(prefill_matmul.supports) where it measured faster on an H200 (prefill_matmul.pays: small
matrices, and wide ones up to 128 tokens); anything else, and every call while
MOE_EDGE_FUSED_PREFILL=0, goes through the dequantize kernel (into a scratch weight) and one
F.linear, the path before it (scripts/prefill_kernel_bench.py times both).

Legend: T = tokens, O = output features, I = input features, P = packed bytes per row of a
plane (I / codes-per-byte), G = groups per row, BO/BJ = block sizes over O and over P."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.quantization import QuantizedMatrix

from . import prefill_matmul

DECODE_MAX_TOKENS = 4  # up to this many tokens, the fused GEMV per token beats dequantize+matmul
DEQUANTIZE_BLOCK_O, DEQUANTIZE_WARPS = 8, 8  # best tile on the H200 (scripts/dequantize_bench.py: 75-80% of its copy rate)


@triton.jit
def _gemv_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, out_ptr,
    O, P, NG,
    WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // WIDTH
    MASK: tl.constexpr = (1 << WIDTH) - 1
    GROUPS_PER_BLOCK: tl.constexpr = BLOCK_J // GROUP
    pid = tl.program_id(0)
    rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    row_ok = rows < O
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for j0 in range(0, P, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)  # [BJ]
        packed = tl.load(codes_ptr + rows[:, None] * P + cols[None, :], mask=row_ok[:, None], other=0)  # [BO, BJ]
        for k in tl.static_range(PER_BYTE):
            codes = ((packed >> (8 - WIDTH * (k + 1))) & MASK).to(tl.float32)  # [BO, BJ]
            xk = tl.load(x_ptr + k * P + cols).to(tl.float32)  # [BJ]
            partial = tl.sum(tl.reshape(codes * xk[None, :], [BLOCK_O, GROUPS_PER_BLOCK, GROUP]), axis=2)
            x_sum = tl.sum(tl.reshape(xk, [GROUPS_PER_BLOCK, GROUP]), axis=1)  # [BO/G]
            groups = (k * P + j0) // GROUP + tl.arange(0, GROUPS_PER_BLOCK)
            meta = rows[:, None] * NG + groups[None, :]
            scale = tl.load(scale_ptr + meta, mask=row_ok[:, None], other=0).to(tl.float32)
            zero = tl.load(zero_ptr + meta, mask=row_ok[:, None], other=0).to(tl.float32)
            acc += tl.sum(scale * (partial - zero * x_sum[None, :]), axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_ptr,
    O, P, NG,
    WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One [BO, BJ] tile of packed bytes -> its PER_BYTE plane slices of the weight. Each group's
    scale and zero is loaded once per row ([BO, BJ/G]) and broadcast over the group's codes, not
    gathered per weight: the gather made this kernel ~10x slower than its bytes allow."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    MASK: tl.constexpr = (1 << WIDTH) - 1
    GROUPS: tl.constexpr = BLOCK_J // GROUP
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    j0 = tl.program_id(1) * BLOCK_J
    cols = j0 + tl.arange(0, BLOCK_J)
    row_ok = rows < O
    packed = tl.load(codes_ptr + rows[:, None] * P + cols[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
    for k in tl.static_range(PER_BYTE):
        groups = (k * P + j0) // GROUP + tl.arange(0, GROUPS)  # [BJ/G] groups of this plane slice
        meta = rows[:, None] * NG + groups[None, :]
        scale = tl.load(scale_ptr + meta, mask=row_ok[:, None], other=0).to(tl.float32)  # [BO, BJ/G]
        zero = tl.load(zero_ptr + meta, mask=row_ok[:, None], other=0).to(tl.float32)
        codes = ((packed >> (8 - WIDTH * (k + 1))) & MASK).to(tl.float32)  # [BO, BJ]
        value = (tl.reshape(codes, [BLOCK_O, GROUPS, GROUP]) - zero[:, :, None]) * scale[:, :, None]
        columns = k * P + cols  # [BJ] input-feature index of this plane slice
        tl.store(out_ptr + rows[:, None] * (P * PER_BYTE) + columns[None, :],
                 tl.reshape(value, [BLOCK_O, BLOCK_J]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _block_j(packed_bytes: int, group: int) -> int:
    """Bytes of a row per step: a multiple of the group that divides the plane's width."""
    for block in (256, 128, 64, 32, 16, 8):
        if block % group == 0 and packed_bytes % block == 0:
            return block
    return 0


def supports(weight: QuantizedMatrix) -> bool:
    """Single-plane codes (2 or 4 bits) whose planes split into whole groups per block."""
    if len(weight.planes) != 1 or weight.bits not in (2, 4):
        return False
    per_byte = 8 // weight.bits
    packed_bytes = weight.shape[1] // per_byte
    return packed_bytes % weight.group_size == 0 and _block_j(packed_bytes, weight.group_size) > 0


def gemv(x: torch.Tensor, weight: QuantizedMatrix, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [I] -> [O] in x's dtype."""
    rows, _ = weight.shape
    codes = weight.planes[0]
    packed_bytes = codes.shape[1]
    out = torch.empty(rows, dtype=x.dtype, device=x.device) if out is None else out
    block_o = 16 if rows <= 8192 else 32
    _gemv_kernel[(triton.cdiv(rows, block_o),)](
        x, codes, weight.scale, weight.zero, out,
        rows, packed_bytes, weight.scale.shape[1],
        WIDTH=weight.bits, GROUP=weight.group_size, BLOCK_O=block_o,
        BLOCK_J=_block_j(packed_bytes, weight.group_size), num_warps=4,
    )
    return out


def dequantize(weight: QuantizedMatrix, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """[O, I] weight in `dtype`, written by one kernel."""
    rows, columns = weight.shape
    codes = weight.planes[0]
    packed_bytes = codes.shape[1]
    out = torch.empty(rows, columns, dtype=dtype, device=codes.device) if out is None else out
    block_o, block_j = DEQUANTIZE_BLOCK_O, _block_j(packed_bytes, weight.group_size)
    grid = (triton.cdiv(rows, block_o), packed_bytes // block_j)
    _dequantize_kernel[grid](
        codes, weight.scale, weight.zero, out,
        rows, packed_bytes, weight.scale.shape[1],
        WIDTH=weight.bits, GROUP=weight.group_size, BLOCK_O=block_o, BLOCK_J=block_j, num_warps=DEQUANTIZE_WARPS,
    )
    return out


def quantized_linear(x: torch.Tensor, weight: QuantizedMatrix) -> torch.Tensor:
    """x [T, I] @ W.T -> [T, O] in x's dtype: the GEMV per token for few tokens, the fused prefill
    kernel for more (unless MOE_EDGE_FUSED_PREFILL=0), else dequantize + F.linear."""
    if not supports(weight):
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype))
    x = x.contiguous()
    if x.shape[0] <= DECODE_MAX_TOKENS:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        for t in range(x.shape[0]):
            gemv(x[t], weight, out[t])
        return out
    if (prefill_matmul.fused_prefill_enabled() and prefill_matmul.supports(weight, x.dtype)
            and prefill_matmul.pays(x.shape[0], weight)):
        return prefill_matmul.prefill_linear(x, weight)
    return torch.nn.functional.linear(x, dequantize(weight, x.dtype))
