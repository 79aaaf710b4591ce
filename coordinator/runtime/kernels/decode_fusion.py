"""The decode step's small glue fused: residual add + RMSNorm in one kernel, and a softmax
router (logits, softmax, top k, renormalisation, and the experts in index order for the
resident path) in one kernel.

Why: a resident decode step on an H200 (Mixtral-8x7B shapes, 32 layers, one CUDA graph per
token) spent ~4.2 ms per token outside the expert GEMVs, nearly all of it in ~1300 kernels of
~2.5 us each. Per layer, torch's residual add and rms_norm.py's RMSNorm are about five launches
(twice per layer, once more for the head), and the router's F.linear + softmax + topk + sum + div
(+ sort + index_select on the resident path) seven more; here they are three.

The numbers are today's, in today's order: the sum rounded to the model's dtype as torch.add
rounds it; the norm in float32, rounded to the dtype, then times the weight in the dtype
(rms_norm.py); the router's logits accumulated in float32 and rounded to the dtype as F.linear's
output is, then a float32 softmax over those (router.route). Only the order of float32
additions inside the reductions differs, hence the bounds of tests/decode_fusion_check.py: the
sum bit-exact, the norm within one ulp of the dtype, the chosen experts equal and their
weights within 1e-6.

Top-k ties (equal probabilities) go to the lowest expert index first, which is what torch.topk
gives on CUDA in practice.

The decoder (decoder.py, its `fusion`) uses these on CUDA with Triton only, and
MOE_EDGE_FUSED_DECODE=0 turns them off (to compare, or to rule them out): read when a Decoder is
made. The CPU keeps the torch ops, which are these kernels' reference. The prompt path never
uses them.

Legend: H = hidden size, E = experts per layer, k = experts per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384  # add_rms_norm: one program holds the whole row (32 values a thread at 16 warps)
MAX_EXPERTS = 256  # the router: every expert's score in one program
MAX_TOP_K = 16


def router_fits(config, router: torch.Tensor, logit_bias: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """The fused router applies: softmax routing with no bias of either kind, shapes in range."""
    experts, hidden = router.shape
    return (config.router == "softmax" and logit_bias is None and bias is None and experts <= MAX_EXPERTS
            and config.top_k <= min(MAX_TOP_K, experts) and hidden <= MAX_HIDDEN and router.is_contiguous())


def _warps(block: int) -> int:
    """Four warps up to 2048 elements a row, then more, so a thread holds at most 16 of each."""
    return max(4, min(16, block // 512))


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (to nearest, ties to even, as torch rounds) and back to float32.
    bfloat16 by hand on the bits: Triton's CPU interpreter truncates there, where the GPU's cvt.rn
    rounds; by hand both give torch's numbers, and the cast after it is exact."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # the 16 bits below the bf16 mantissa, rounded away
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a NaN stays one
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(a_ptr, b_ptr, weight_ptr, sum_ptr, normed_ptr, eps, x32_ptr, x_sums_ptr,
                         H: tl.constexpr, BLOCK: tl.constexpr, HAS_B: tl.constexpr,
                         PARTS: tl.constexpr = 0, X32: tl.constexpr = False, CHUNK: tl.constexpr = 16):
    """One program, one row: s = a + b (rounded to the row's dtype), stored at sum_ptr; then
    rms_norm(s) * weight at normed_ptr. Without b, s is a (nothing stored at sum_ptr).
    PARTS > 0: b is PARTS float32 rows [PARTS, H] (the slot kernels' w2 partial sums), summed in
    float32 and rounded to the dtype first, as `out.add_(partial.sum(0).to(dtype))` onto a zeroed
    out gives it. X32: the normed row also stored as float32 at x32_ptr [H] and its sums per CHUNK
    consecutive columns at x_sums_ptr [H / CHUNK] (the slot kernels' inputs; H a multiple of CHUNK)."""
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < H
    DTYPE: tl.constexpr = normed_ptr.dtype.element_ty
    x = tl.load(a_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if HAS_B:
        if PARTS > 0:
            b = tl.zeros([BLOCK], dtype=tl.float32)
            for part in tl.static_range(PARTS):  # in row order; unrolled, so the loads are in flight together
                b += tl.load(b_ptr + part * H + cols, mask=mask, other=0.0)
            b = _rounded(b, DTYPE)  # the experts' sum in the dtype, as the layer's out held it
        else:
            b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = _rounded(x + b, DTYPE)  # as torch.add rounds
        tl.store(sum_ptr + cols, x.to(DTYPE), mask=mask)
    mean_square = tl.sum(x * x, axis=0) / H
    normed = _rounded(x * tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + eps)), DTYPE)  # rounded, then scaled
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    result = _rounded(weight * normed, DTYPE)  # [BLOCK], 0 past H
    tl.store(normed_ptr + cols, result.to(DTYPE), mask=mask)
    if X32:
        tl.store(x32_ptr + cols, result, mask=mask)
        chunks = tl.arange(0, BLOCK // CHUNK)
        tl.store(x_sums_ptr + chunks, tl.sum(tl.reshape(result, [BLOCK // CHUNK, CHUNK]), axis=1),
                 mask=chunks < H // CHUNK)


def add_rms_norm(a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 sum_out: torch.Tensor | None, normed_out: torch.Tensor,
                 x32_out: torch.Tensor | None = None, x_sums_out: torch.Tensor | None = None,
                 partials: bool = False) -> None:
    """a, b [1, H] -> sum_out = a + b, normed_out = rms_norm(sum_out, weight, eps), in one launch.
    b None: normed_out = rms_norm(a, weight, eps) alone (sum_out unused). All in the model's dtype,
    contiguous; weight [H]. partials: b is float32 partial sums [R, H] instead, standing for their
    sum rounded to the dtype.
    x32_out [1, H] and x_sums_out [H / 16] float32, both or neither: normed_out's values in float32
    and their sums per 16 columns (kernels/slot_experts.py's x and x_sums)."""
    hidden = a.shape[-1]
    parts = 0
    if partials:
        assert b is not None and b.dtype == torch.float32 and b.dim() == 2
        parts = b.shape[0]  # partial sums [R, H]
        assert b.shape[1] == hidden and b.is_contiguous()
        rows = [a, normed_out, weight, sum_out]
    else:
        rows = [a, normed_out, weight] + ([b, sum_out] if b is not None else [])
    assert a.numel() == hidden <= MAX_HIDDEN and all(t.numel() == hidden for t in rows)
    assert normed_out.is_contiguous() and weight.is_contiguous() and (sum_out is None or sum_out.is_contiguous())
    assert all(t.dtype == normed_out.dtype for t in rows), "one dtype for the rows and the weight"
    x32 = x32_out is not None
    assert x32 == (x_sums_out is not None)
    if x32:
        assert hidden % 16 == 0 and x32_out.numel() == hidden and x_sums_out.numel() == hidden // 16
        assert x32_out.dtype == x_sums_out.dtype == torch.float32 and x32_out.is_contiguous() and x_sums_out.is_contiguous()
    block = triton.next_power_of_2(hidden)
    has_b = b is not None
    a, b = a.contiguous(), b.contiguous() if has_b else None  # no-ops for the decoder's rows
    _add_rms_norm_kernel[(1,)](a, b if has_b else a, weight, sum_out if has_b else normed_out, normed_out,
                               eps, x32_out if x32 else normed_out, x_sums_out if x32 else normed_out,
                               H=hidden, BLOCK=block, HAS_B=has_b, PARTS=parts, X32=x32, num_warps=_warps(block))


def _router_blocks(experts: int, hidden: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_H): every expert in one block, and columns enough that a step of the
    loop holds ~8K products (16 a thread at 16 warps)."""
    block_e = triton.next_power_of_2(experts)
    return block_e, min(triton.next_power_of_2(hidden), max(16, 8192 // block_e))


@triton.jit
def _softmax_router_kernel(x_ptr, router_ptr, weights_ptr, experts_ptr, sorted_experts_ptr,
                           sorted_positions_ptr, sorted_weights_ptr,
                           H: tl.constexpr, E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NORMALIZE: tl.constexpr,
                           SORTED: tl.constexpr):
    """One program: logits [E] = router [E, H] @ x [H] in float32, rounded to x's dtype; their
    float32 softmax; the top K (lowest index first among equal scores), renormalised to sum to 1
    when NORMALIZE; weights [K] float32 and experts [K] int64 stored best first. SORTED: also the
    chosen experts in ascending index order, the top-k position of each, and their weights in
    that order."""
    rows = tl.arange(0, BLOCK_E)  # [BE]
    row_mask = rows < E
    acc = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):  # [BE, BH] products summed per column slot, reduced once after
        cols = start + tl.arange(0, BLOCK_H)
        col_mask = cols < H
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BH]
        w = tl.load(router_ptr + rows[:, None] * H + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)  # [BE, BH]
        acc += w * x[None, :]
    logits = _rounded(tl.sum(acc, axis=1), x_ptr.dtype.element_ty)  # [BE]: as F.linear's output rounds
    logits = tl.where(row_mask, logits, float("-inf"))
    shifted = tl.exp(logits - tl.max(logits, axis=0))
    probs = shifted / tl.sum(shifted, axis=0)  # [BE], 0 past E
    probs = tl.where(row_mask, probs, -1.0)  # padding never chosen
    slots = tl.arange(0, BLOCK_K)  # [BK]
    top = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_index = tl.full([BLOCK_K], BLOCK_E, dtype=tl.int32)  # past every expert where unused
    for position in tl.static_range(K):  # k rounds of (max, lowest index holding it), then masked out
        best = tl.max(probs, axis=0)
        index = tl.minimum(tl.min(tl.where(probs == best, rows, BLOCK_E), axis=0), E - 1)  # NaN scores: still an expert
        top = tl.where(slots == position, best, top)
        top_index = tl.where(slots == position, index, top_index)
        probs = tl.where(rows == index, -1.0, probs)
    used = slots < K
    if NORMALIZE:
        top = top / tl.sum(tl.where(used, top, 0.0), axis=0)
    tl.store(weights_ptr + slots, top, mask=used)
    tl.store(experts_ptr + slots, top_index.to(tl.int64), mask=used)
    if SORTED:  # rank of each chosen expert among the chosen, by index: where it goes in index order
        rank = tl.sum((top_index[None, :] < top_index[:, None]).to(tl.int32), axis=1)  # [BK]
        tl.store(sorted_experts_ptr + rank, top_index.to(tl.int64), mask=used)
        tl.store(sorted_positions_ptr + rank, slots.to(tl.int64), mask=used)
        tl.store(sorted_weights_ptr + rank, top, mask=used)


def softmax_router(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool,
                   weights_out: torch.Tensor, experts_out: torch.Tensor,
                   sorted_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """x [1, H] (the normed MoE input) and router [E, H], both in the model's dtype -> weights_out
    [1, k] float32 and experts_out [1, k] int64, best first, as router.route gives them for a
    softmax router after F.linear. sorted_out: (experts [k] int64 ascending, their top-k
    positions [k] int64, their weights [1, k] float32), what the resident path's torch.sort and
    index_select give."""
    experts, hidden = router.shape
    assert x.numel() == hidden and x.is_contiguous() and router.is_contiguous() and x.dtype == router.dtype
    assert weights_out.numel() == top_k and experts_out.numel() == top_k and experts_out.is_contiguous()
    block_e, block_h = _router_blocks(experts, hidden)
    sorted_experts, positions, sorted_weights = sorted_out if sorted_out is not None else (experts_out, experts_out,
                                                                                          weights_out)
    _softmax_router_kernel[(1,)](x, router, weights_out, experts_out, sorted_experts, positions, sorted_weights,
                                 H=hidden, E=experts, K=top_k, BLOCK_E=block_e, BLOCK_H=block_h,
                                 BLOCK_K=triton.next_power_of_2(top_k), NORMALIZE=normalize,
                                 SORTED=sorted_out is not None, num_warps=_warps(block_e * block_h))
