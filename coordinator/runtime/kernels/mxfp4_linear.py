"""x @ W.T for an MXFP4 W (GPT-OSS's experts, common/mxfp4.py) read as it is stored: the e2m1
codes and e8m0 scales of the cache slot's views, never a 16-bit copy of the whole weight.

Decode (few tokens): one fused kernel reads each packed byte once, decodes its two e2m1 codes in
registers, multiplies them by x in float32, sums each 32-weight block and applies the block's
power-of-two scale once:
    sum_i W[o,i] x[i] = sum_b 2^(s[o,b] - 127) * sum_{i in block b} e2m1(code[o,i]) x[i].
The bytes it must read are the codes and the scales: 4.25 bits per weight. One launch serves all
the tokens (a program per (token, row block)); a row block's programs for the tokens are neighbours
in the grid, so the weight should come from memory about once and from L2 for the other tokens
(not measured).
Prefill (many tokens): a kernel dequantizes into a scratch weight in x's dtype, then one matmul.

Both can be captured in a CUDA graph: no host syncs, and every allocation is sized by the
shapes alone.

Decoding by bit arithmetic, no table and no integer-to-float conversion (an H200 converts 16
values per SM per clock, under half the weights its memory delivers at 4.25 bits each):
  e2m1   a code is sign | e (2 bits) | m (1 bit). Moved into a float32's bits as sign -> bit 31,
         e -> the exponent's two low bits, m -> the mantissa's top bit, it reads as its value
         times 2^-126, e = 0 (0 and 0.5) landing on float32's zero and subnormals: two shifts,
         two masks (the GEMV does two codes 16 bits apart with three of each: the word's halves
         as two bfloat16s, then each half made a float32). The GEMV multiplies x by 2^64 first
         and the block sums by 2^62, so the products stay in float32's normal range (|x| must
         stay under 2^64; products under 2^-64 lose precision as subnormals); the dequantize
         kernel multiplies each weight by 2^126. These are exact; they need subnormals kept,
         which Triton's float32 multiply and FMA do (PTX mul.f32 / fma.rn.f32, no .ftz).
  e8m0   a scale byte s is 2^(s - 127): the float32 whose exponent field is s (s = 0 is 2^-127,
         written as its subnormal's bits; s = 255, NaN in the OCP format and absent from
         checkpoints, reads as infinity).
The GEMV reads the codes as int32 words, eight codes a word (column 8w + k in bits 4k..4k+3,
little-endian); compiled for sm_90 it loads 16 bytes (4 words: one scale block) per thread
and instruction, and spends about 6 instructions a weight (decode, FMA, x, reductions): an H200
issues 128 a clock per SM, so the decode, not the memory, may bound it (to be measured).

Legend: T = tokens, O = output features, I = input features, P = I / 2 packed bytes per row,
W = P / 4 words per row, NB = I / 32 scale blocks per row, BO/BW/BJ = block sizes over O, W and
P (a block is 4 words, 16 bytes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from common.mxfp4 import BLOCK, Mxfp4Matrix

DECODE_MAX_TOKENS = 4  # the HQQ kernel's bound (quantized_linear.py); not yet measured for MXFP4
BYTES_PER_BLOCK = BLOCK // 2  # two codes a byte
WORDS_PER_BLOCK = BYTES_PER_BLOCK // 4
# The GEMV's tile: BW = 128 words (1 KiB of a row) a step and 16 words a thread, so that x, loaded
# once per column, serves several rows. Chosen from sm_90 SASS compiled without a GPU (about 6
# instructions a weight; 8 to 13 at 8 or 4 words a thread) and from the programs it makes at
# GPT-OSS's shapes (360 for w13 and w2 on 132 SMs). Never timed: scripts/mxfp4_bench.py sweeps it.
GEMV_BLOCK_W, GEMV_WORDS_PER_THREAD = 128, 16
DEQUANTIZE_BLOCK_O, DEQUANTIZE_BLOCK_J, DEQUANTIZE_WARPS = 8, 128, 8  # the HQQ dequantize kernel's tile; never timed for MXFP4


SIGN_BIT = tl.constexpr(-(1 << 31))  # bit 31 of an int32
E2M1_MAGNITUDE_BITS = tl.constexpr(0b111 << 22)  # where e and m go: exponent bits 0-1, mantissa bit 22
E2M1_PAIR_MAGNITUDE_BITS = tl.constexpr((0b111 << 22) | (0b111 << 6))  # the same in each 16-bit half
PAIR_SIGN_BITS = tl.constexpr(-(1 << 31) | (1 << 15))  # bits 31 and 15
HIGH_HALF = tl.constexpr(-(1 << 16))  # 0xFFFF0000
X_SCALE, SUM_SCALE = tl.constexpr(2.0**64), tl.constexpr(2.0**62)  # x * 2^64 * 2^-126 * 2^62 = x
WEIGHT_SCALE = tl.constexpr(2.0**126)


@triton.jit
def _shifted(word, n: tl.constexpr):
    if n >= 0:
        return word << n
    else:
        return word >> -n


@triton.jit
def _e2m1_over_2_126(word, k: tl.constexpr):
    """int32 words -> their k-th e2m1 code (bits 4k..4k+3) as float32, times 2^-126."""
    magnitude = _shifted(word, 22 - 4 * k) & E2M1_MAGNITUDE_BITS
    sign = _shifted(word, 28 - 4 * k) & SIGN_BIT
    return (magnitude | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_pair_over_2_126(word, k: tl.constexpr):
    """int32 words -> their codes k and k + 4 (k < 4) as float32, times 2^-126, in fewer
    instructions than two _e2m1_over_2_126: the codes sit 16 bits apart, so one shift puts both
    magnitudes and one more both signs where two bfloat16s (the word's halves) want them; each
    half is then a float32 by a mask or a shift."""
    magnitudes = _shifted(word, 6 - 4 * k) & E2M1_PAIR_MAGNITUDE_BITS
    pair = magnitudes | (_shifted(word, 12 - 4 * k) & PAIR_SIGN_BITS)
    low = (pair << 16).to(tl.float32, bitcast=True)
    high = (pair & HIGH_HALF).to(tl.float32, bitcast=True)
    return low, high


@triton.jit
def _e8m0(scale):
    """int32 scale bytes -> 2^(s - 127), float32."""
    bits = tl.where(scale == 0, 1 << 22, scale << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr, words_ptr, scales_ptr, out_ptr,
    O, NB, x_stride, codes_block_stride, scales_stride, out_stride,
    BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """out[t, rows] for one token t and BO rows, BW words of each row (BW / 4 scale blocks) a step.
    The row length and stride come in 16-byte blocks so that Triton sees them as multiples of 4
    words and loads 16 bytes at a time."""
    BLOCKS: tl.constexpr = BLOCK_W // 4
    W = NB * 4
    words_stride = codes_block_stride * 4
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    row_ok = rows < O
    x_row = x_ptr + token * x_stride
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        words = w0 + tl.arange(0, BLOCK_W)  # [BW]
        word_ok = words < W
        packed = tl.load(words_ptr + rows[:, None] * words_stride + words[None, :],
                         mask=row_ok[:, None] & word_ok[None, :], other=0)  # [BO, BW] int32
        word_sums = tl.zeros([BLOCK_O, BLOCK_W], dtype=tl.float32)
        for k in tl.static_range(4):  # codes k and k + 4 of each word at once
            low, high = _e2m1_pair_over_2_126(packed, k)
            x_low = tl.load(x_row + 8 * words + k, mask=word_ok, other=0).to(tl.float32) * X_SCALE  # [BW]
            x_high = tl.load(x_row + 8 * words + k + 4, mask=word_ok, other=0).to(tl.float32) * X_SCALE
            # Explicit FMAs: Triton 3.10 stops contracting a * b + c by default.
            word_sums = tl.fma(low, x_low[None, :], word_sums)
            word_sums = tl.fma(high, x_high[None, :], word_sums)
        block_sums = tl.sum(tl.reshape(word_sums, [BLOCK_O, BLOCKS, 4]), axis=2) * SUM_SCALE  # [BO, BW/4]
        blocks = w0 // 4 + tl.arange(0, BLOCKS)
        scale = tl.load(scales_ptr + rows[:, None] * scales_stride + blocks[None, :],
                        mask=row_ok[:, None] & (blocks < NB)[None, :], other=0).to(tl.int32)  # [BO, BW/4]
        acc += tl.sum(block_sums * _e8m0(scale), axis=1)
    tl.store(out_ptr + token * out_stride + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, out_ptr,
    O, NB, codes_block_stride, scales_stride, out_stride,
    BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One [BO, BJ] tile of packed bytes -> the [BO, 2 BJ] weights they hold; each block's scale is
    loaded once per row and broadcast over its 32 weights."""
    BLOCKS: tl.constexpr = BLOCK_J // 16
    P = NB * 16
    codes_stride = codes_block_stride * 16
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    j0 = tl.program_id(1) * BLOCK_J
    cols = j0 + tl.arange(0, BLOCK_J)  # [BJ]
    row_ok = rows < O
    packed = tl.load(codes_ptr + rows[:, None] * codes_stride + cols[None, :],
                     mask=row_ok[:, None] & (cols < P)[None, :], other=0).to(tl.int32)  # [BO, BJ]
    blocks = j0 // 16 + tl.arange(0, BLOCKS)
    scale = _e8m0(tl.load(scales_ptr + rows[:, None] * scales_stride + blocks[None, :],
                          mask=row_ok[:, None] & (blocks < NB)[None, :], other=0).to(tl.int32))  # [BO, BJ/16]
    even = tl.reshape(_e2m1_over_2_126(packed, 0) * WEIGHT_SCALE, [BLOCK_O, BLOCKS, 16]) * scale[:, :, None]
    odd = tl.reshape(_e2m1_over_2_126(packed, 1) * WEIGHT_SCALE, [BLOCK_O, BLOCKS, 16]) * scale[:, :, None]
    weight = tl.reshape(tl.join(even, odd), [BLOCK_O, 2 * BLOCK_J])  # [BO, 2 BJ]: columns 2j, 2j + 1 side by side
    columns = 2 * j0 + tl.arange(0, 2 * BLOCK_J)
    tl.store(out_ptr + rows[:, None] * out_stride + columns[None, :], weight.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (columns < 2 * P)[None, :])


def supports(weight) -> bool:
    """An Mxfp4Matrix whose codes and scales are uint8 rows of unit stride with consistent shapes,
    the codes readable as int32 words (rows 4-byte aligned, a whole number of blocks apart): any blob's or checkpoint's views."""
    if not isinstance(weight, Mxfp4Matrix):
        return False
    codes, scales = weight.codes, weight.scales
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8 or codes.dim() != 2 or scales.dim() != 2:
        return False
    rows, packed_bytes = codes.shape
    return (packed_bytes > 0 and packed_bytes % BYTES_PER_BLOCK == 0 and codes.device == scales.device
            and tuple(scales.shape) == (rows, packed_bytes // BYTES_PER_BLOCK)
            and codes.stride(1) == 1 and scales.stride(1) == 1
            and codes.stride(0) % BYTES_PER_BLOCK == 0 and codes.storage_offset() % 4 == 0
            and codes.data_ptr() % 4 == 0)


def _gemv_block_o(rows: int) -> int:
    """Rows per program: enough programs to share out evenly over an H200's 132 SMs at GPT-OSS's
    shapes (a guess)."""
    return 8 if rows <= 4096 else 16


def gemv(x: torch.Tensor, weight: Mxfp4Matrix, out: torch.Tensor | None = None, *,
         block_o: int | None = None, block_w: int = GEMV_BLOCK_W, num_warps: int | None = None) -> torch.Tensor:
    """x [T, I] (unit stride along I) -> [T, O] in x's dtype; `out`, when given, [T, O] with unit
    stride along O. The block sizes are for scripts/mxfp4_bench.py."""
    tokens, rows = x.shape[0], weight.shape[0]
    words = weight.codes.view(torch.int32)  # [O, W]: a view, no copy
    out = torch.empty(tokens, rows, dtype=x.dtype, device=x.device) if out is None else out
    if tokens == 0:
        return out
    block_o = block_o or _gemv_block_o(rows)
    block_w = max(WORDS_PER_BLOCK, min(block_w, triton.next_power_of_2(words.shape[1])))
    num_warps = num_warps or max(1, min(8, block_o * block_w // (32 * GEMV_WORDS_PER_THREAD)))
    _gemv_kernel[(tokens, triton.cdiv(rows, block_o))](
        x, words, weight.scales, out,
        rows, weight.scales.shape[1], x.stride(0), weight.codes.stride(0) // BYTES_PER_BLOCK, weight.scales.stride(0),
        out.stride(0), BLOCK_O=block_o, BLOCK_W=block_w, num_warps=num_warps,
    )
    return out


def dequantize(weight: Mxfp4Matrix, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """[O, I] weight in `dtype`, written by one kernel; what Mxfp4Matrix.dequantize gives."""
    rows, columns = weight.shape
    packed_bytes = weight.codes.shape[1]
    out = torch.empty(rows, columns, dtype=dtype, device=weight.codes.device) if out is None else out
    block_j = max(BYTES_PER_BLOCK, min(DEQUANTIZE_BLOCK_J, triton.next_power_of_2(packed_bytes)))
    grid = (triton.cdiv(rows, DEQUANTIZE_BLOCK_O), triton.cdiv(packed_bytes, block_j))
    _dequantize_kernel[grid](
        weight.codes, weight.scales, out,
        rows, weight.scales.shape[1], weight.codes.stride(0) // BYTES_PER_BLOCK, weight.scales.stride(0), out.stride(0),
        BLOCK_O=DEQUANTIZE_BLOCK_O, BLOCK_J=block_j, num_warps=DEQUANTIZE_WARPS,
    )
    return out


def mxfp4_linear(x: torch.Tensor, weight: Mxfp4Matrix) -> torch.Tensor:
    """x [T, I] @ W.T -> [T, O] in x's dtype: the fused GEMV for up to DECODE_MAX_TOKENS tokens,
    else the dequantize kernel and one matmul."""
    if not supports(weight):
        return F.linear(x, weight.dequantize(x.dtype))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return gemv(x, weight)
    return F.linear(x, dequantize(weight, x.dtype))
