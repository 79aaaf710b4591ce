"""A prompt's MoE layer when every expert of the layer is resident: all its experts in two
launches read in place from the layer's cache slots, with no read-back of the routing.

Why: the per-expert prompt path (moe.MoEBlock.forward) reads the routing back to the host once a
layer and then issues ~12 small launches per expert: with 128 experts a layer (Qwen3-30B-A3B) a
512-token layer took 28.7 ms that way against 1.07 ms here (scripts/grouped_prefill_bench.py on an
H200, 2026-12-01). Here the host issues the same dozen launches per layer whatever the routing,
and none waits for the GPU:

  route (the MoE block's own router, on the device)
  plan_tiles: the T*k choices sorted by expert (stable), each expert's rows cut into tiles of BM
      rows; a tile table [MAX_TILES] (its expert, its first sorted row) and each expert's end row.
      MAX_TILES bounds the tiles of any routing (cdiv(T*k, BM) + E), so the grid is known on the
      host; the tiles past the routing's own exit at once.
  w13 launch (grid: tiles x output blocks): a tile's rows gathered from x by token, its expert's
      codes found in the slot memory by the device-side slot of that expert, dequantized in
      registers and fed to the tensor cores (prefill_matmul's tile code) -> gate_up [T*k, 2F]
      in sorted order
  the activation on every row at once (the expert's own, common/expert_activation.py)
  w2 launch: the same on the sorted hidden rows; each output row rounded to the model's dtype,
      times its routing weight, rounded again (as the per-expert path rounds ys * weight) and
      stored at the choice's own index t*k + p
  out += the k rows of each token summed (float32 sum, one rounding; for k = 2 the same value as
      the per-expert path's two bf16 adds onto zero)

Numerics: each weight rounds as prefill_matmul's and the dequantize kernel's; only the order of
the float32 sums differs from the per-expert path (and, for k > 2 or a shared expert, the order
of the bf16 adds). 16-bit models only (tl.dot would round float32 to TF32); anything else keeps
the per-expert path, and so does a chunk of a model with few experts that get more than
MOST_ROWS rows each on average (`pays`: there dequantize once + cuBLAS measured faster).
`MOE_EDGE_GROUPED_PREFILL=0` keeps it too, to compare.

Legend: T = tokens, k = experts per token, R = T*k rows, E = experts per layer, H = hidden size,
F = expert FFN width, O = output rows of a matrix, P = packed bytes per row of a plane, G =
groups per row; BM/BN/BK = block sizes over rows, O and P."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.store.blob_layout import BlobLayout

from . import interpreted
from .prefill_matmul import PrefillConfig, _accumulate, _fit_block_k, _weight_tile
from .slot_experts import _matrix


@triton.jit(do_not_specialize=["num_experts"])  # (ints specialise on % 16: the offsets keep their alignment)
def _grouped_kernel(
    x_ptr, order_ptr, tile_expert_ptr, tile_row_ptr, expert_end_ptr, memory_ptr, slot_ptr,
    route_ptr, out_ptr, x_stride, out_stride, num_experts,
    NBYTES, CODES, SCALE, ZERO, O, P, NG,  # the blob's offsets and the matrix's sizes (not compiled in:
    TOP_K: tl.constexpr,                   # one compile serves every matrix of a model)
    WIDTH: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOWN: tl.constexpr,
):
    """One tile of BM sorted rows (one expert's) times BN output rows of its matrix. Not DOWN
    (w13): x rows gathered by token (order // TOP_K), out rows the sorted rows. DOWN (w2): x rows
    the sorted rows, the output rounded, weighted by route[order], rounded, stored at out[order]."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:  # past the routing's tiles
        return
    sorted_rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)  # [BM]
    m_ok = sorted_rows < tl.load(expert_end_ptr + expert)
    choice = tl.load(order_ptr + sorted_rows, mask=m_ok, other=0)  # [BM] t * k + p of each row
    x_rows = sorted_rows if DOWN else choice // TOP_K
    blob = memory_ptr + tl.load(slot_ptr + expert).to(tl.int64) * NBYTES
    codes_ptr = blob + CODES
    scale_ptr = (blob + SCALE).to(tl.pointer_type(tl.float16))
    zero_ptr = (blob + ZERO).to(tl.pointer_type(tl.float16))
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] of the matrix
    row_ok = rows < O
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, P, BLOCK_K):
        cols = j0 + tl.arange(0, BLOCK_K)
        packed = tl.load(codes_ptr + rows[:, None] * P + cols[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
        for k in tl.static_range(PER_BYTE):
            w = _weight_tile(packed, k, rows, row_ok, scale_ptr, zero_ptr, NG, k * P + j0, WIDTH, GROUP, DTYPE)
            xk = tl.load(x_ptr + x_rows[:, None] * x_stride + (k * P + cols)[None, :], mask=m_ok[:, None], other=0)
            acc = _accumulate(acc, xk, w, SWAP_AB, DOT_IN_FP32)
    if DOWN:
        weight = tl.load(route_ptr + choice, mask=m_ok, other=0)  # [BM] float32
        dest = choice
    else:
        dest = sorted_rows
    if SWAP_AB:  # acc [BN, BM]: stored through transposed pointers, as prefill_matmul does
        if DOWN:
            acc = acc.to(DTYPE).to(tl.float32) * weight[None, :]
        tl.store(out_ptr + dest[None, :] * out_stride + rows[:, None], acc.to(DTYPE),
                 mask=row_ok[:, None] & m_ok[None, :])
    else:
        if DOWN:
            acc = acc.to(DTYPE).to(tl.float32) * weight[:, None]
        tl.store(out_ptr + dest[:, None] * out_stride + rows[None, :], acc.to(DTYPE),
                 mask=m_ok[:, None] & row_ok[None, :])


@dataclass(frozen=True)
class Tiles:
    """A layer step's tile table on the device (plan_tiles)."""

    order: torch.Tensor  # [R] int64: the choice t * k + p of each sorted row
    tile_expert: torch.Tensor  # [MAX_TILES] int32: a tile's expert, E past the routing's tiles
    tile_row: torch.Tensor  # [MAX_TILES] int32: its first sorted row
    expert_end: torch.Tensor  # [E] int32: one past each expert's last sorted row
    used: torch.Tensor  # [] int64: the experts with a row (what the MoE block counts as hits)


def max_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """The most tiles any routing of `rows` choices over E experts cuts into: each expert's
    ceil(count / BM) is at most count / BM + 1, and only experts with a row have tiles."""
    return triton.cdiv(rows, block_m) + min(num_experts, rows)


def plan_tiles(experts: torch.Tensor, num_experts: int, block_m: int) -> Tiles:
    """experts [T, k] (device, int64) -> the tile table: device ops only, no read-back."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # sorted row -> choice
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    expert_end = torch.cumsum(counts, 0)  # [E]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)  # [E] one past each expert's last tile
    index = torch.arange(max_tiles(flat.numel(), num_experts, block_m), device=flat.device)
    tile_expert = torch.searchsorted(tile_end, index, right=True)  # E past the last tile
    owner = tile_expert.clamp(max=num_experts - 1)
    tile_row = expert_end[owner] - counts[owner] + (index - (tile_end[owner] - tiles[owner])) * block_m
    return Tiles(order, tile_expert.to(torch.int32), tile_row.to(torch.int32), expert_end.to(torch.int32),
                 (counts > 0).sum())


def supports(layout: BlobLayout, dtype: torch.dtype) -> bool:
    """Single-plane 2/4-bit HQQ experts without biases, groups of whole 16-byte K blocks, planes
    of whole groups, a 16-bit model."""
    spec = layout.spec
    if dtype not in (torch.bfloat16, torch.float16) or not spec.quantized or spec.is_mxfp4 or spec.bits not in (2, 4):
        return False
    names = {slot.name for slot in layout.slots}
    if "w13.bias" in names or "w2.bias" in names or "w13.codes.p1" in names or spec.group_size % 16:
        return False
    return all(_matrix(layout, m).packed % spec.group_size == 0 for m in ("w13", "w2"))


# (most rows an expert gets on average, config): the best of scripts/grouped_prefill_bench.py's
# sweep on an H200 (2026-12-01: Mixtral-8x7B 2-bit at 128-2048 tokens, Qwen3-30B-A3B 4-bit),
# first fit wins.
CONFIG_TABLE: tuple[tuple[int, PrefillConfig], ...] = (
    (64, PrefillConfig(64, 128, 64, 4, 3, True)),
    (1 << 62, PrefillConfig(128, 64, 64, 4, 3, True)),
)
# Where it pays (the same bench, against the per-expert path with its routing read-back): with
# many experts a layer always (Qwen3-30B-A3B's 128: 22-40x at 128-2048 tokens, the per-expert
# path's launches dominate there), with few only while an expert gets few rows (Mixtral's 8:
# 1.41x at 128 tokens, 32 rows each; 0.99x at 512, 128 rows each, where a whole resident prompt
# measured 4901 tok/s against 4848 in one call, and the grouped step issues no read-back that a
# busy host would delay; 0.84x at 1024, 0.80x at 2048: each tile of rows dequantizes its weight
# tiles again, where the per-expert path dequantizes once for cuBLAS).
MANY_EXPERTS = 32
MOST_ROWS = 128  # per expert on average, below MANY_EXPERTS


def pays(rows: int, num_experts: int) -> bool:
    """Whether the grouped step measured faster than the per-expert path for `rows` choices over
    E experts."""
    return num_experts >= MANY_EXPERTS or rows <= MOST_ROWS * num_experts


def grouped_config(rows: int, num_experts: int, bits: int, group: int) -> PrefillConfig:
    """The table's config for the rows an expert gets on average, its BK fitted to the group."""
    per_expert = triton.cdiv(rows, num_experts)
    config = next(config for most, config in CONFIG_TABLE if per_expert <= most)
    return PrefillConfig(config.block_m, config.block_n, _fit_block_k(config.block_k, group), config.num_warps,
                         config.num_stages, config.swap_ab)


class GroupedExperts:
    """A layer shape's grouped prompt step on CUDA (or Triton's interpreter): `__call__(x,
    experts, weights, memory, slots, out)` adds sum_p weights[t, p] * expert_{experts[t, p]}(x[t])
    to out[t] and returns how many experts had a row. `config` overrides grouped_config (the bench)."""

    def __init__(self, layout: BlobLayout, config: PrefillConfig | None = None) -> None:
        self.layout, self.config = layout, config
        self.w13, self.w2 = _matrix(layout, "w13"), _matrix(layout, "w2")
        self.activation = layout.activation
        self.pays = pays  # the MoE block asks before each layer (a bench or test may say always)

    def _launch(self, matrix, config: PrefillConfig, tiles: Tiles, top_k: int, x, memory, slots, route, out, *,
                down: bool) -> None:
        spec = self.layout.spec
        grid = (tiles.tile_expert.numel(), triton.cdiv(matrix.rows, config.block_n))
        _grouped_kernel[grid](
            x, tiles.order, tiles.tile_expert, tiles.tile_row, tiles.expert_end, memory, slots,
            route, out, x.stride(0), out.stride(0), tiles.expert_end.numel(),
            NBYTES=self.layout.nbytes, CODES=matrix.codes, SCALE=matrix.scale, ZERO=matrix.zero,
            O=matrix.rows, P=matrix.packed, NG=matrix.groups, TOP_K=top_k,
            WIDTH=spec.bits, GROUP=spec.group_size,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWAP_AB=config.swap_ab,
            DOT_IN_FP32=interpreted() and x.dtype == torch.bfloat16, DOWN=down,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    def __call__(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, memory: torch.Tensor,
                 slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [T, H] 16-bit; experts [T, k] int64 and weights [T, k] float32 (the router's);
        memory [K, nbytes] uint8 (the layer's slots); slots [E] int64, each expert's slot; out
        [T, H] += . Returns how many experts had a row (a device scalar: no read-back)."""
        tokens, top_k = experts.shape
        rows, num_experts = experts.numel(), slots.numel()
        spec = self.layout.spec
        config = self.config or grouped_config(rows, num_experts, spec.bits, spec.group_size)
        tiles = plan_tiles(experts, num_experts, config.block_m)
        gate_up = torch.empty(rows, self.w13.rows, dtype=x.dtype, device=x.device)  # [R, 2F] sorted rows
        self._launch(self.w13, config, tiles, top_k, x, memory, slots, weights, gate_up, down=False)
        hidden = self.activation(gate_up).contiguous()  # [R, F]
        weighted = torch.empty(rows, self.w2.rows, dtype=x.dtype, device=x.device)  # [R, H] by choice
        self._launch(self.w2, config, tiles, top_k, hidden, memory, slots, weights.reshape(-1).float().contiguous(), weighted,
                     down=True)
        out += weighted.view(tokens, top_k, -1).sum(1, dtype=torch.float32).to(out.dtype)
        return tiles.used
