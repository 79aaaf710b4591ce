"""One decode token's attention in three Triton launches instead of ~11 torch kernels, reading
only the KV positions the token attends to (flash-decoding).

On a fast GPU the resident decode step is bound by its kernel count, and today's one-token path
(model.Transformer.attention) also reads the whole KV capacity every step, masking what lies past
the position: with a 32k capacity that is 134 MB per layer per token for a token at position 10.
Here, after the qkv matmul (q, k, v side by side in one [1, (Q+2K)*D] row):

    1. `_rotary_store_kernel`, grid (Q+2K,): turns each q and k head in place by the step's rotary
       row ([cos | sin'], RotaryEmbedding's layout; only the first R of D turn: partial rotary)
       and writes the turned k and the v heads into the layer's KV block [2K, S, D] at the
       device position. Each product and the sum are rounded to the model dtype as torch's
       turn_ rounds them (on an H200 a few values still came out a unit off torch's).
    2. `_split_attention_kernel`, grid (K, C): program (g, c) takes KV head g's G = Q/K query
       heads and chunk c of the positions, reads only the positions in [lo, position] (lo =
       position - window + 1 on a sliding-window layer, else 0), and keeps an online softmax in
       float32: it writes its chunk's max m, sum l and unnormalized output acc. Chunks past the
       position (or before the window) do nothing.
    3. `_combine_kernel`, grid (Q,): merges the valid chunks' (m, l, acc) of one query head into
       the output [1, Q*D] in the model dtype, head-major as the torch path's `out` before o_proj.

C, the number of chunks, is fixed by the capacity (`chunk_size`): a CUDA graph's grid cannot
depend on the position, so the position is read on the device and the work past it skipped.

Numerics: scores q.k * scale stay float32 (torch rounds them to the model dtype twice, after
the matmul and after the scale); the probabilities are rounded to the model dtype before the
product with V in 16-bit models (as torch's softmax output is), float32 otherwise, with float32
accumulation. tests/decode_attention_check.py bounds the error against float64 math.

Used by model.Transformer.attention for one token with a device-side position, on CUDA with
Triton, unless MOE_EDGE_FUSED_ATTENTION=0 (model.fused_decode_attention decides); everything else
(prompts, latent attention, attention sinks, models without a stacked qkv, the CPU) stays on the
torch path. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (the tests).

Legend: Q = query heads, K = KV heads, G = Q/K, D = head dim, R = rotary width, S = KV capacity,
C = chunks, N = positions per block."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpreted

MIN_CHUNK = 64  # the smallest chunk, in positions (a multiple of every tile's N below)
MAX_CHUNKS = 256  # chunks grow past MIN_CHUNK positions only where the capacity would give more
# The split kernel's tile per dtype: (N positions per step of a chunk's loop, warps, stages).
# Compiled for sm_90 without a GPU (triton.compile, cuobjdump -res-usage, 2026-12-01; not timed):
# 16-bit with N=64 and 4 warps takes 138 registers, no spills (8 warps: 226); float32's
# dot in FMAs spilled at N=64 (255 registers and a 520-750 byte stack at 4 or 8 warps), at N=32,
# 8 warps, 2 stages it takes 70 and no stack.
TILES = {torch.float32: (32, 8, 2), torch.bfloat16: (64, 4, 3), torch.float16: (64, 4, 3)}
COMBINE_WARPS, ROTARY_WARPS = 4, 1  # combine: 39 registers; rotary: 24 (sm_90, as above)
COMBINE_BLOCK_C = 16  # chunks merged per step of the combine's loop
LOG2E = 1.4426950408889634
INTERPRETED = interpreted()  # Triton's CPU interpreter (tests)


@triton.jit
def _rotary_store_kernel(qkv_ptr, rows_ptr, cache_ptr, position_ptr, Q, K, cache_head_stride,
                         D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program h: head h of the qkv row (q heads, then k, then v). q and k heads turn in place;
    k and v heads go to cache row h - Q at the position."""
    head = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_D)  # [BD]
    inside = offsets < D
    x = tl.load(qkv_ptr + head * D + offsets, mask=inside)  # [BD], the model dtype
    if head < Q + K:  # q or k: turned
        HALF: tl.constexpr = R // 2
        turning = offsets < R
        partner = tl.where(offsets < HALF, offsets + HALF, offsets - HALF)  # [x2 | x1]
        swapped = tl.load(qkv_ptr + head * D + partner, mask=turning, other=0.0)
        cos = tl.load(rows_ptr + offsets, mask=turning, other=0.0)
        sin = tl.load(rows_ptr + R + offsets, mask=turning, other=0.0)  # sin' = [-sin1 | sin2]
        dtype = x.dtype
        # rounded as torch's turn_ rounds: the two products, then their sum
        straight = (x.to(tl.float32) * cos.to(tl.float32)).to(dtype)
        crossed = (swapped.to(tl.float32) * sin.to(tl.float32)).to(dtype)
        turned = (straight.to(tl.float32) + crossed.to(tl.float32)).to(dtype)
        x = tl.where(turning, turned, x)
        tl.store(qkv_ptr + head * D + offsets, x, mask=inside)
    if head >= Q:  # k or v: into the cache at the position
        position = tl.load(position_ptr)
        tl.store(cache_ptr + (head - Q) * cache_head_stride + position * D + offsets, x, mask=inside)


@triton.jit
def _split_attention_kernel(qkv_ptr, cache_ptr, position_ptr, m_ptr, l_ptr, acc_ptr,
                            K, cache_head_stride, window, scale_log2, num_chunks,
                            G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Program (g, c): KV head g's query heads over chunk c's positions in [lo, position].
    Scores are kept in log2 units (scale_log2 = scale * log2 e) so that exp2 serves. UPCAST: the
    two products in float32 (ieee, no TF32): for float32 models, and under the interpreter,
    whose tl.dot multiplies bf16 operands' bit patterns as integers."""
    group, chunk = tl.program_id(0), tl.program_id(1)
    position = tl.load(position_ptr)
    lo = tl.where(window > 0, tl.maximum(position - window + 1, 0), 0)  # the first attended position
    chunk_start = chunk * CHUNK
    first = tl.maximum(lo, chunk_start)  # the chunk's first and past-last attended positions
    end = tl.minimum(position + 1, chunk_start + CHUNK)
    heads = tl.arange(0, G_PAD)  # [GP]: the group's query heads, padded for tl.dot
    dims = tl.arange(0, BLOCK_D)  # [BD]
    head_ok, dim_ok = heads < G, dims < D
    q = tl.load(qkv_ptr + (group * G + heads)[:, None] * D + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [GP, BD], turned by the first kernel
    keys_ptr = cache_ptr + group * cache_head_stride
    values_ptr = cache_ptr + (K + group) * cache_head_stride
    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    # blocks aligned to BLOCK_N from the one holding `first`: each holds an attended position,
    # so m is finite after the first; an empty chunk runs no block
    start = chunk_start + ((first - chunk_start) // BLOCK_N) * BLOCK_N
    for block in range(start, end, BLOCK_N):
        positions = block + tl.arange(0, BLOCK_N)  # [N]
        attended = (positions >= first) & (positions < end)
        tile_mask = attended[:, None] & dim_ok[None, :]
        k = tl.load(keys_ptr + positions[:, None] * D + dims[None, :], mask=tile_mask, other=0.0)  # [N, BD]
        v = tl.load(values_ptr + positions[:, None] * D + dims[None, :], mask=tile_mask, other=0.0)  # [N, BD]
        if UPCAST:
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # [GP, N]
        else:  # 16-bit tensor cores, float32 accumulation
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(attended[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # [GP]
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])  # [GP, N]
        l = l * alpha + tl.sum(p, axis=1)
        p = p.to(v.dtype)  # probabilities rounded to the model dtype, as torch's softmax output is
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        m = m_new
    writes = head_ok & (heads * 0 + first < end)  # [GP]: an empty chunk writes nothing
    rows = group * G + heads  # [GP]: query heads
    tl.store(m_ptr + rows * num_chunks + chunk, m, mask=writes)
    tl.store(l_ptr + rows * num_chunks + chunk, l, mask=writes)
    tl.store(acc_ptr + (rows * num_chunks + chunk)[:, None] * D + dims[None, :], acc,
             mask=writes[:, None] & dim_ok[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, position_ptr, window, num_chunks,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program h: query head h's valid chunks merged, out[h*D : h*D + D] = sum acc e^m / sum l e^m."""
    head = tl.program_id(0)
    position = tl.load(position_ptr)
    lo = tl.where(window > 0, tl.maximum(position - window + 1, 0), 0)
    first, last = lo // CHUNK, position // CHUNK  # the chunks that wrote partials
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    l = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block in range((first // BLOCK_C) * BLOCK_C, last + 1, BLOCK_C):  # each block holds a valid chunk
        chunks = block + tl.arange(0, BLOCK_C)  # [BC]
        valid = (chunks >= first) & (chunks <= last)
        index = head * num_chunks + chunks
        chunk_m = tl.load(m_ptr + index, mask=valid, other=float("-inf"))  # [BC]
        chunk_l = tl.load(l_ptr + index, mask=valid, other=0.0)
        chunk_acc = tl.load(acc_ptr + index[:, None] * D + dims[None, :], mask=valid[:, None] & dim_ok[None, :],
                            other=0.0)  # [BC, BD]
        m_new = tl.maximum(m, tl.max(chunk_m, axis=0))  # [1]
        alpha = tl.exp2(m - m_new)
        weights = tl.exp2(chunk_m - m_new)  # [BC]
        l = l * alpha + tl.sum(chunk_l * weights, axis=0)
        acc = acc * alpha + tl.sum(chunk_acc * weights[:, None], axis=0)
        m = m_new
    out = acc / l
    tl.store(out_ptr + head * D + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def chunk_size(capacity: int) -> int:
    """Positions per chunk: MIN_CHUNK, or a power of two times it so that at most MAX_CHUNKS cover
    the capacity (the combine's loop and the partials stay small at long contexts)."""
    size = MIN_CHUNK
    while math.ceil(capacity / size) > MAX_CHUNKS:
        size *= 2
    return size


class Partials:
    """The split kernel's float32 partials for one KV capacity, reused by every layer (layers
    run one after another on one stream): m and l [Q, C], acc [Q, C, D]. `chunk`: positions
    per chunk, a multiple of MIN_CHUNK (tests try several); chunk_size's by default."""

    def __init__(self, heads: int, head_dim: int, capacity: int, device: torch.device, *,
                 chunk: int | None = None) -> None:
        assert chunk is None or chunk % MIN_CHUNK == 0
        self.chunk = chunk or chunk_size(capacity)
        self.chunks = math.ceil(capacity / self.chunk)
        self.m = torch.empty(heads, self.chunks, dtype=torch.float32, device=device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(heads, self.chunks, head_dim, dtype=torch.float32, device=device)


def decode_attention(heads: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor, position: torch.Tensor,
                     partials: Partials, *, num_heads: int, window: int | None, scale: float,
                     rotary_dim: int) -> torch.Tensor:
    """heads [1, Q+2K, D] (the qkv row: q, k, v heads; q and k turned here, in place), rows
    [1, 2R] the position's rotary row, cache [2K, S, D] the layer's KV block (keys then values;
    the new k and v are written at `position`, a device tensor [1]) -> [1, Q*D] in heads' dtype,
    the attention output before o_proj."""
    _, total, dim = heads.shape
    kv_heads = (total - num_heads) // 2
    group = num_heads // kv_heads
    assert heads.is_contiguous() and rows.is_contiguous() and cache.stride(2) == 1 and cache.stride(1) == dim
    block_d = triton.next_power_of_2(dim)
    _rotary_store_kernel[(total,)](heads, rows, cache, position, num_heads, kv_heads, cache.stride(0),
                                   D=dim, R=rotary_dim, BLOCK_D=block_d, num_warps=ROTARY_WARPS)
    block_n, warps, stages = TILES[heads.dtype]
    _split_attention_kernel[(kv_heads, partials.chunks)](
        heads, cache, position, partials.m, partials.l, partials.acc, kv_heads, cache.stride(0), window or 0,
        scale * LOG2E, partials.chunks, G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim,
        BLOCK_D=block_d, CHUNK=partials.chunk, BLOCK_N=block_n, UPCAST=heads.dtype == torch.float32 or INTERPRETED,
        num_warps=warps, num_stages=stages)
    out = torch.empty(1, num_heads * dim, dtype=heads.dtype, device=heads.device)  # [1, Q*D]
    _combine_kernel[(num_heads,)](partials.m, partials.l, partials.acc, out, position, window or 0, partials.chunks,
                                  D=dim, BLOCK_D=block_d, CHUNK=partials.chunk, BLOCK_C=COMBINE_BLOCK_C,
                                  num_warps=COMBINE_WARPS)
    return out
