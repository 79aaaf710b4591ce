"""y = x @ W.T for many tokens (the prompt path) on an HQQ-quantized W, in one fused kernel.

Why: for a prompt, quantized_linear used to dequantize the whole [O, I] weight into a bf16
scratch (a Mixtral 2-bit w13: 29 MB of codes read, 235 MB of bf16 written, ~83 us on an H200)
and then read that scratch back in a matmul. Here each program keeps a tile of the packed codes
in registers, dequantizes it there and feeds it to the tensor cores; the bf16 weight never
reaches memory.

The layout (common/quantization.py, single plane): codes [O, P] uint8, P = I / PER_BYTE; input
column i = k * P + j is byte j's k-th code from the top, `(byte >> (8 - WIDTH * (k + 1))) & MASK`;
fp16 scale and zero per group of GROUP consecutive columns, w = (code - zero) * scale. So one
[BN, BK] byte tile holds PER_BYTE plane tiles of the weight, columns k * P + j0 .. + BK, and each
meets its own x tile [BM, BK]: the bytes are loaded once, the x tiles PER_BYTE times.

Numerics: each weight is (code - zero) * scale in float32, rounded once to x's dtype, exactly as
quantized_linear._dequantize_kernel writes it (the code becomes a float32 by a bit trick, exactly;
see _code_as_float). tl.dot multiplies 16-bit tiles exactly and accumulates in float32, so the
result differs from dequantize + F.linear only by the order of summation (and the final rounding
of two different float32 sums). float32 x is left to the plain path: tl.dot would round it to
TF32, which F.linear on float32 does not.

Configs: a fixed table by token count (prefill_config), no autotuning: a first call or a CUDA
graph capture compiles one kernel, not a sweep; one per (table row, bits, dtype, shape's
divisibility), T left unspecialised, each cached by Triton on disk after (~1-3 s to compile for
sm_90 here). The table is a guess from the tile sizes and the
shared memory they need (sm_90, 227 KB a block); scripts/prefill_kernel_bench.py times it and a
short list of others on a GPU. NOT YET TIMED OR RUN ON A GPU: only checked under Triton's
interpreter and compiled for sm_90 without one (tests/test_prefill_kernel.py). Timed on an H200
(2026-12-01): `pays` says where it beat dequantize + F.linear, and quantized_linear takes it only there.

Legend: T = tokens, O = output features, I = input features, P = packed bytes per row, G = groups
per row; BM/BN/BK = block sizes over T, O and P."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.quantization import QuantizedMatrix

from . import interpreted

FLOAT_MAGIC = tl.constexpr(0x4B000000)  # the bits of 2.0**23 as a float32
FLOAT_MAGIC_VALUE = tl.constexpr(8388608.0)  # 2.0**23


@dataclass(frozen=True)
class PrefillConfig:
    """One launch's tile: BM tokens x BN outputs, BK packed bytes of a row per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False  # out.T = W x.T: the dequantized tile is the MMA's A operand (see _prefill_kernel)

    def label(self) -> str:
        swap = "t" if self.swap_ab else ""
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}{swap}"


# (most tokens, 2-bit config, 4-bit config), first fit wins. Untimed guesses, from sm_90 code
# compiled without a GPU (ptxas: no spills, 148-212 registers): BM grows with T so that a weight
# tile serves more tokens per dequantization; BK at 2 bits is half of 4 bits' (at BM >= 64) so
# that the PER_BYTE x tiles of a step (4 at 2 bits, 2 at 4) need about the same shared memory
# (41-115 KB at 3-4 stages, of 227 KB). All swap_ab: with it even a 16-token tile compiles to
# wgmma (without, BM < 64 gets mma.sync) and the weight goes to wgmma from registers, never
# through shared memory.
CONFIG_TABLE: tuple[tuple[int, PrefillConfig, PrefillConfig], ...] = (
    (16, PrefillConfig(16, 128, 64, 4, 4, True), PrefillConfig(16, 128, 64, 4, 4, True)),
    (32, PrefillConfig(32, 128, 64, 4, 4, True), PrefillConfig(32, 128, 64, 4, 4, True)),
    (64, PrefillConfig(64, 128, 64, 4, 3, True), PrefillConfig(64, 128, 64, 4, 3, True)),
    (1 << 62, PrefillConfig(128, 128, 64, 8, 3, True), PrefillConfig(128, 128, 64, 8, 3, True)),
)
# An H200's SMs (132): below this many programs, narrower output tiles. Two per SM narrowed
# Mixtral's w13 to BN 64 at 64-128 tokens, 15-20% slower there than BN 128 (2026-12-01).
MIN_PROGRAMS = 132
SMALL_MATRIX = 8 << 20  # weights of at most this many elements: the fused kernel measured faster at every T
MOST_TOKENS = 128  # past this many tokens, dequantize once + cuBLAS measured faster (each token block re-dequantizes)


def pays(tokens: int, weight: QuantizedMatrix) -> bool:
    """Where the fused kernel measured faster than dequantize + F.linear on an H200
    (scripts/prefill_kernel_bench.py, 2026-12-01): small matrices at every token count (Qwen3-
    30B-A3B's experts, 1.1-2.8x), and wide ones (O >= 2 I: Mixtral's w13, 1.3-2.2x) up to
    MOST_TOKENS; not deep ones (Mixtral's w2, O = 4096 < I = 14336: 0.5-0.75x past 16 tokens,
    its grid too narrow for the long K loop) nor past MOST_TOKENS (0.54-0.75x at 256-512)."""
    rows, columns = weight.shape
    return rows * columns <= SMALL_MATRIX or (tokens <= MOST_TOKENS and rows >= 2 * columns)


def fused_prefill_enabled() -> bool:
    """MOE_EDGE_FUSED_PREFILL=0 sends every prompt matmul to dequantize + F.linear, to compare."""
    return os.environ.get("MOE_EDGE_FUSED_PREFILL", "1") != "0"


def supports(weight: QuantizedMatrix, dtype: torch.dtype) -> bool:
    """Single-plane 2- or 4-bit codes, planes of whole groups, a 16-bit x, contiguous tensors,
    and a group that a K block of at least 16 bytes divides (tl.dot's smallest K)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if len(weight.planes) != 1 or weight.bits not in (2, 4) or weight.group_size % 16:
        return False
    codes = weight.planes[0]
    packed_bytes = weight.shape[1] // (8 // weight.bits)
    if packed_bytes % weight.group_size or codes.shape != (weight.shape[0], packed_bytes):
        return False
    return all(t.is_contiguous() for t in (codes, weight.scale, weight.zero))


def _fit_block_k(block_k: int, group: int) -> int:
    """The largest K block <= block_k that divides the group (a plane tile then lies in one
    group, so one scale and zero per row serve it). The planes are whole groups (supports), so
    it also divides P."""
    while group % block_k:
        block_k //= 2
    return block_k


@functools.lru_cache(maxsize=4096)  # called per expert matmul: a prompt's host time is launches
def prefill_config(tokens: int, rows: int, bits: int, group: int) -> PrefillConfig:
    """The table's tile for T tokens, BK fitted to the group, and BN halved while the grid has
    fewer than MIN_PROGRAMS programs (Qwen3-30B-A3B's experts: O = 1536 or 2048) down to 32, or
    with swap_ab to 64: BN is then wgmma's M, 64 a warpgroup (at 32 sm_90 code falls back to
    mma.sync), so a 64-row tile gets one warpgroup (with two, compiled code stores the weight
    to shared memory)."""
    for most, two_bit, four_bit in CONFIG_TABLE:
        if tokens <= most:
            config = two_bit if bits == 2 else four_bit
            break
    block_n, narrowest = config.block_n, 64 if config.swap_ab else 32
    while block_n > narrowest and triton.cdiv(tokens, config.block_m) * triton.cdiv(rows, block_n) < MIN_PROGRAMS:
        block_n //= 2
    warps = min(config.num_warps, 4 * block_n // 64) if config.swap_ab else config.num_warps
    return PrefillConfig(config.block_m, block_n, _fit_block_k(config.block_k, group), warps,
                         config.num_stages, config.swap_ab)


@triton.jit
def _code_as_float(code):
    """int32 codes (< 2^23) -> float32, exactly: the code in a float32's mantissa under the
    exponent of 2^23 reads as 2^23 + code, and subtracting 2^23 is exact. Two integer/float ops
    instead of a conversion, which an H100/H200 issues at 16 a clock per SM (an eighth of its
    float32 rate)."""
    return (code | FLOAT_MAGIC).to(tl.float32, bitcast=True) - FLOAT_MAGIC_VALUE


@triton.jit
def _weight_tile(packed, k: tl.constexpr, rows, row_ok, scale_ptr, zero_ptr, NG, plane_start,
                 WIDTH: tl.constexpr, GROUP: tl.constexpr, DTYPE: tl.constexpr):
    """Plane k of a [BN, BK] int32 byte tile -> the weight [BN, BK] in DTYPE, rounded as
    _dequantize_kernel rounds it. plane_start = k * P + j0, the tile's first input column; the
    tile lies in one group (GROUP % BK == 0), whose scale and zero [BN] are broadcast over it."""
    MASK: tl.constexpr = (1 << WIDTH) - 1
    group = plane_start // GROUP
    scale = tl.load(scale_ptr + rows * NG + group, mask=row_ok, other=0).to(tl.float32)  # [BN]
    zero = tl.load(zero_ptr + rows * NG + group, mask=row_ok, other=0).to(tl.float32)  # [BN]
    code = _code_as_float((packed >> (8 - WIDTH * (k + 1))) & MASK)  # [BN, BK]
    return ((code - zero[:, None]) * scale[:, None]).to(DTYPE)


@triton.jit
def _accumulate(acc, xk, w, SWAP_AB: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc += xk [BM, BK] @ w.T, or w [BN, BK] @ xk.T when SWAP_AB; float32 accumulation."""
    a, b = (w, xk) if SWAP_AB else (xk, w)  # [BN, BK], [BM, BK] or the other way round
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit(do_not_specialize=["T"])  # one compile for every prompt length (T only masks), not one per T % 16
def _prefill_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, out_ptr,
    T, O, P, NG, x_stride, out_stride,
    WIDTH: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """out[BM tokens, BN rows]. Program axis 0 walks the token blocks, so neighbouring programs
    share a weight tile: it should come from memory about once and from L2 for the other token
    blocks (not measured). SWAP_AB computes the transposed tile, W [BN, BK] @ x.T [BK, BM]: on sm_90 wgmma may then take
    the dequantized weight from registers (as A; B must be in shared memory) instead of storing it
    to shared memory first, and its M of 64 is BN, not a 16-token BM (the same products and sums).
    DOT_IN_FP32 (the interpreter only, whose tl.dot multiplies bfloat16 as raw integers) feeds
    tl.dot float32 copies of the same 16-bit values: their products are exact either way."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    token_ok, row_ok = tokens < T, rows < O
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, P, BLOCK_K):
        cols = j0 + tl.arange(0, BLOCK_K)  # [BK] bytes of a row
        packed = tl.load(codes_ptr + rows[:, None] * P + cols[None, :], mask=row_ok[:, None], other=0).to(tl.int32)  # [BN, BK]
        for k in tl.static_range(PER_BYTE):
            w = _weight_tile(packed, k, rows, row_ok, scale_ptr, zero_ptr, NG, k * P + j0, WIDTH, GROUP, DTYPE)  # [BN, BK]
            xk = tl.load(x_ptr + tokens[:, None] * x_stride + (k * P + cols)[None, :],
                         mask=token_ok[:, None], other=0)  # [BM, BK]: input columns k * P + j0 ..
            acc = _accumulate(acc, xk, w, SWAP_AB, DOT_IN_FP32)
    if SWAP_AB:
        tl.store(out_ptr + tokens[None, :] * out_stride + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & token_ok[None, :])
    else:
        tl.store(out_ptr + tokens[:, None] * out_stride + rows[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=token_ok[:, None] & row_ok[None, :])


def prefill_linear(x: torch.Tensor, weight: QuantizedMatrix, config: PrefillConfig | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, I] (bf16 or fp16, unit column stride) @ W.T -> [T, O] in x's dtype; `config` overrides
    the table (the bench). The caller checks supports(weight, x.dtype)."""
    tokens, columns = x.shape
    rows = weight.shape[0]
    assert columns == weight.shape[1] and x.stride(1) == 1, (x.shape, x.stride(), weight.shape)
    codes = weight.planes[0]
    config = config or prefill_config(tokens, rows, weight.bits, weight.group_size)
    assert weight.group_size % config.block_k == 0, (config, weight.group_size)
    out = torch.empty(tokens, rows, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (tokens, rows) and out.stride(1) == 1 and out.dtype == x.dtype, (out.shape, out.stride())
    grid = (triton.cdiv(tokens, config.block_m), triton.cdiv(rows, config.block_n))
    _prefill_kernel[grid](
        x, codes, weight.scale, weight.zero, out,
        tokens, rows, codes.shape[1], weight.scale.shape[1], x.stride(0), out.stride(0),
        WIDTH=weight.bits, GROUP=weight.group_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWAP_AB=config.swap_ab,
        DOT_IN_FP32=interpreted() and x.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
