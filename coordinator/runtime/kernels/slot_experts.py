"""A token's top-k experts computed straight from their cache slots: Triton kernels that take a
layer's slot memory ([K, nbytes] uint8, one blob per slot) and a device tensor of slot indices,
and find each expert's codes, scales and zeros by offset inside its blob (the blob layout is the
same for every slot). No host sync picks the slots and nothing is copied: a CUDA graph can hold
the whole expert step of a layer whatever the routing chose.

Two launches per layer: w13 for every chosen expert at once with the SiLU gate applied on the
way out (grid: row blocks x experts), then w2 for every expert, each split along its input into
parts (grid: row blocks x parts x experts) whose float32 partial sums, already weighted by the
routing weight, one small sum adds into the layer's output (on the decoder's fused resident
path, the next add + norm kernel instead: decode_fusion.add_rms_norm's partials). No atomics:
the sum is the same on every run. v1 writes w2's input sums in the w13 epilogue; the MoE input
norm can write w13's (gate_up_prepared).

Codes become floats by the exponent trick instead of int -> float conversions (those run at a
quarter of the rate on the GPU and bound the older kernel): a byte is shifted once so its top
bit sits at the float's mantissa bit 22; masking out plane k's bits and OR-ing in the exponent of
1.0 gives v = 1 + c / 2**(W*(k+1)), so sum c*x = 2**(W*(k+1)) * (sum v*x - sum x). That is one
logical op and one FMA per weight.

Four formulations of the GEMV share this interface and these launches (VARIANTS, picked by
MOE_EDGE_SLOT_KERNEL, DEFAULT_VARIANT otherwise): v1 below; v2 (slot_gemv_v2.py) with one AND per
code and software-pipelined loads; v3 (slot_gemv_v3.py), whole groups per thread, no layout
change in the loop; v4 (slot_gemv_v4.py), 2-bit codes two per integer op on 32-bit words as fp16
subnormals, multiplied as fp16 pairs (1.4-1.6 instructions a code in an offline sm_90 compile,
v1 4.3-5.0; bf16/fp16 models and 2-bit codes only, v1 runs under its name otherwise).
scripts/slot_expert_bench.py times them and prints each one's best shapes: on an H200
(2026-12-01, Mixtral-8x7B 2-bit top-2 step) v1 took 145.7-146.4 us, v2 185.7, v3 164.8 and v4
189.6 at their best shapes (v4's fewer instructions did not make it faster: it is not bound by
them but by keeping enough loads in flight, which its layout does worse), so v1 is the default
and the others are there to try on other GPUs.

Off CUDA the decoder runs the same step in torch ops (decoder.py: the slot views gathered by
index, dequantize, matmul), which is also these kernels' reference (tests/slot_expert_check.py).

Legend: k = experts per token, K = slots per layer, H = hidden size, F = expert FFN width,
O = output rows, P = packed bytes per row of a plane, G = groups per row, W = code width."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from common.errors import ConfigError
from common.store.blob_layout import BlobLayout

from . import interpreted
from .slot_gemv_v2 import slot_gemv_v2_kernel
from .slot_gemv_v3 import slot_gemv_v3_kernel
from .slot_gemv_v4 import KINDS as V4_KINDS
from .slot_gemv_v4 import input_factors as v4_input_factors
from .slot_gemv_v4 import prepare_input as v4_prepare_input
from .slot_gemv_v4 import slot_gemv_v4_kernel

# Block shapes: the best of scripts/slot_expert_bench.py's sweeps on an H200 (2026-12-01; the
# afternoon's sweep of v1 found none better than these).
W13_BLOCK_O, W13_BLOCK_J, W13_WARPS, W13_UNROLL = 128, 64, 4, 1
W2_BLOCK_O, W2_BLOCK_J, W2_WARPS, W2_UNROLL, W2_SPLIT = 16, 256, 4, 1, 4
STREAM = PREFETCH = False  # measured no better (STREAM) or worse (PREFETCH) on the H200: see the bench
# v2 (slot_gemv_v2.py): (BLOCK_O, BLOCK_J, warps, unroll, stages) for w13, the same and the split
# for w2: the best of its sweep on the H200 (2026-12-01).
V2_W13 = (16, 64, 4, 1, 4)
V2_W2 = (64, 64, 4, 1, 3, 4)
# v3 (slot_gemv_v3.py): the same fields; BLOCK_J / 16 threads share a row (each a run of whole
# groups), UNROLL counts groups per trip, BLOCK_O * BLOCK_J / 16 = 32 * warps gives a thread one
# row. The best of its sweep on the H200 (2026-12-01).
V3_W13 = (32, 64, 4, 1, 2)
V3_W2 = (64, 32, 4, 1, 2, 4)
# v4 (slot_gemv_v4.py): v3's fields and meaning (BLOCK_J / 16 threads a row, each a run of whole
# groups); BLOCK_O * BLOCK_J / 16 / (32 * warps) rows a thread share its input pairs. The best
# of a 35 s sweep on the H200 (2026-12-01): 189.6 us a top-2 step, against v1's 146.4.
V4_W13 = (64, 64, 8, 1, 1)
V4_W2 = (128, 16, 4, 1, 1, 8)
VARIANTS = ("v1", "v2", "v3", "v4")  # the formulations; MOE_EDGE_SLOT_KERNEL picks one (kernels/__init__.py)
DEFAULT_VARIANT = "v1"  # what runs unless MOE_EDGE_SLOT_KERNEL says otherwise: the fastest on the H200


CHUNK = 16  # bytes of a row that one thread reduces on its own (one 16-byte load)


@triton.jit
def _load_codes(pointers, STREAM: tl.constexpr):
    """STREAM: codes are read once, so past L1 (.cg), leaving it to the scales and zeros."""
    if STREAM:
        return tl.load(pointers, cache_modifier=".cg")
    return tl.load(pointers)


@triton.jit
def _slot_gemv_kernel(
    x_ptr, x_sums_ptr, memory_ptr, slot_ptr, route_ptr, out_ptr, SPLIT, out_sums_ptr,
    X_STRIDE: tl.constexpr,  # elements between the experts' inputs (0: one input for all)
    NBYTES: tl.constexpr, CODES: tl.constexpr, SCALE: tl.constexpr, ZERO: tl.constexpr,
    O: tl.constexpr, P: tl.constexpr, NG: tl.constexpr,
    WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    GATED: tl.constexpr, ROUND: tl.constexpr, STREAM: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, UNROLL: tl.constexpr = 1, OUT_SUMS: tl.constexpr = False,
):
    """x float32 [*, I] and its sums per CHUNK columns x_sums [*, I / CHUNK]. GATED: rows r
    (gate) and r + O (up) of a [2O, I] matrix -> silu(gate) * up, rounded to ROUND (the model's
    dtype) where the plain path rounds, at out[e, r]; OUT_SUMS (BLOCK_O a multiple of 16): also
    the float32 sums of each 16 consecutive stored values at out_sums[e, r / 16] (w2's x_sums).
    Else: rows r of an [O, I] matrix,
    times the routing weight of expert e, float32 partial sums at out[e * SPLIT + part, r].

    Each step takes BLOCK_J bytes of each row; the products are summed per CHUNK bytes inside a
    thread and kept per chunk ([BO, BJ / CHUNK], scaled by their group's scale and zero) until
    the end, so the loop has no cross-thread reductions."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    CHUNKS: tl.constexpr = BLOCK_J // 16
    block = tl.program_id(0)
    part = tl.program_id(1)
    expert = tl.program_id(2)
    blob = memory_ptr + tl.multiple_of(tl.load(slot_ptr + expert).to(tl.int64) * NBYTES, 256)  # blobs are 256-aligned
    codes_ptr = blob + CODES
    scale_ptr = (blob + SCALE).to(tl.pointer_type(tl.float16))
    zero_ptr = (blob + ZERO).to(tl.pointer_type(tl.float16))
    x_ptr = x_ptr + expert * X_STRIDE
    x_sums_ptr = x_sums_ptr + expert * (X_STRIDE // 16)
    rows = block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    acc = tl.zeros([BLOCK_O, CHUNKS], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_O, CHUNKS], dtype=tl.float32)
    STEP: tl.constexpr = BLOCK_J * UNROLL  # bytes of a row per trip round the loop
    steps: tl.constexpr = P // STEP
    per_part = (steps + SPLIT - 1) // SPLIT
    first_step = part * per_part
    last_step = tl.minimum(first_step + per_part, steps)
    tile = rows[:, None] * P + tl.arange(0, BLOCK_J)[None, :]  # [BO, BJ] byte offsets of a step's codes
    # PREFETCH: the next step's codes are loaded before this step's arithmetic (past the last
    # step that reads the bytes that follow, inside the blob, unused); more registers per thread.
    if PREFETCH:
        next_codes = _load_codes(codes_ptr + tile + first_step * STEP, STREAM)
        if GATED:
            next_up = _load_codes(codes_ptr + O * P + tile + first_step * STEP, STREAM)
    # [BO, BJ/16] offsets of each chunk's group (scale, zero) and of its x sum, made once here:
    # in the loop they only move by a scalar, so they keep the products' layout (no shuffles).
    meta_base = rows[:, None] * NG + ((tl.arange(0, CHUNKS) * 16) // GROUP)[None, :]
    chunk_base = tl.zeros([BLOCK_O, CHUNKS], dtype=tl.int32) + tl.arange(0, CHUNKS)[None, :]
    for step in range(first_step, last_step):
        for unrolled in tl.static_range(UNROLL):  # independent loads, in flight together
            j0 = step * STEP + unrolled * BLOCK_J
            cols = j0 + tl.arange(0, BLOCK_J)  # [BJ]
            if PREFETCH:
                codes, up_codes = next_codes, next_up if GATED else next_codes
                next_codes = _load_codes(codes_ptr + tile + j0 + BLOCK_J, STREAM)
                if GATED:
                    next_up = _load_codes(codes_ptr + O * P + tile + j0 + BLOCK_J, STREAM)
            else:
                codes = _load_codes(codes_ptr + tile + j0, STREAM)
                up_codes = _load_codes(codes_ptr + O * P + tile + j0, STREAM) if GATED else codes
            shifted = codes.to(tl.int32) << 15  # [BO, BJ]: a byte's bit 7 at mantissa bit 22
            shifted_up = up_codes.to(tl.int32) << 15
            for k in tl.static_range(PER_BYTE):
                mask = ((1 << WIDTH) - 1) << (23 - WIDTH * (k + 1))  # plane k's bits, below the top of the mantissa
                factor = 1 << (WIDTH * (k + 1))
                xk = tl.load(x_ptr + k * P + cols)  # [BJ]
                x_sum = tl.load(x_sums_ptr + (k * P + j0) // 16 + chunk_base)  # [BO, BJ/16]
                meta = meta_base + (k * P + j0) // GROUP  # [BO, BJ/16]
                v = ((shifted & mask) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + c / factor
                dot = tl.sum(tl.reshape(v * xk[None, :], [BLOCK_O, CHUNKS, 16]), axis=2)  # [BO, BJ/16]
                scale = tl.load(scale_ptr + meta).to(tl.float32)
                zero = tl.load(zero_ptr + meta).to(tl.float32)
                acc += scale * (factor * (dot - x_sum) - zero * x_sum)  # sum over the chunk of W x
                if GATED:
                    v = ((shifted_up & mask) | 0x3F800000).to(tl.float32, bitcast=True)
                    dot = tl.sum(tl.reshape(v * xk[None, :], [BLOCK_O, CHUNKS, 16]), axis=2)
                    scale = tl.load(scale_ptr + meta + O * NG).to(tl.float32)
                    zero = tl.load(zero_ptr + meta + O * NG).to(tl.float32)
                    acc_up += scale * (factor * (dot - x_sum) - zero * x_sum)
    total = tl.sum(acc, axis=1)  # [BO]
    if GATED:  # rounded where the plain path rounds: gate and up, silu(gate), the product
        gate = total.to(ROUND).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(ROUND).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(ROUND).to(tl.float32)
        stored = (silu * up).to(ROUND).to(out_ptr.dtype.element_ty)  # [BO]
        tl.store(out_ptr + expert * O + rows, stored)
        if OUT_SUMS:  # what w2 reads as its x_sums: sums of the values just stored, per 16 rows
            sums = tl.sum(tl.reshape(stored.to(tl.float32), [BLOCK_O // 16, 16]), axis=1)  # [BO / 16]
            tl.store(out_sums_ptr + expert * (O // 16) + block * (BLOCK_O // 16) + tl.arange(0, BLOCK_O // 16), sums)
    else:
        weight = tl.load(route_ptr + expert).to(tl.float32)
        tl.store(out_ptr + (expert * SPLIT + part) * O + rows, total * weight)


@dataclass(frozen=True)
class _Matrix:
    """Where one quantized matrix lies inside a blob, and its shape."""

    codes: int
    scale: int
    zero: int
    rows: int  # O
    packed: int  # P
    groups: int  # G


def _matrix(layout: BlobLayout, prefix: str) -> _Matrix:
    slots = {slot.name: slot for slot in layout.slots}
    codes, scale = slots[f"{prefix}.codes.p0"], slots[f"{prefix}.scale"]
    return _Matrix(codes.offset, scale.offset, slots[f"{prefix}.zero"].offset,
                   codes.shape[0], codes.shape[1], scale.shape[1])


def _fit(size: int, preferred: int, smallest: int) -> int:
    """The largest block from `preferred` down (halving, not below `smallest`) that divides
    `size`; 0 if none does."""
    block = preferred
    while block >= smallest:
        if size % block == 0:
            return block
        block //= 2
    return 0


@dataclass(frozen=True)
class _Blocks:
    rows: int  # BLOCK_O
    bytes: int  # BLOCK_J
    warps: int
    unroll: int  # UNROLL
    stages: int = 1  # STAGES (v2, v3)


def _blocks(matrix: _Matrix, rows: int, preferred: tuple[int, ...], whole_groups: int = 0) -> _Blocks:
    """Powers of two: a block of bytes and the group divide one another, as the kernel needs.
    whole_groups (v3: the group size): BLOCK_J / 16 threads share a row, each a run of whole
    groups, at least two (one would make the run's scales contiguous, and the loads change
    layout), and a trip takes UNROLL of its groups."""
    block_o, block_j, warps, unroll, *stages = preferred
    if whole_groups:
        groups = matrix.packed // whole_groups
        share = block_j // CHUNK
        while share > 1 and (groups % (2 * share) or share & (share - 1)):
            share //= 2
        return _Blocks(_fit(rows, block_o, 1), share * CHUNK, warps, _fit(groups // share, unroll, 1), *stages)
    block_j = _fit(matrix.packed, block_j, CHUNK)
    return _Blocks(_fit(rows, block_o, 1), block_j, warps, _fit(matrix.packed // block_j, unroll, 1), *stages)


def supports(layout: BlobLayout) -> bool:
    """Single-plane HQQ codes (2 or 4 bits), SiLU-gated, no biases, groups of whole 16-byte
    chunks (a power of two), planes of whole groups; anything else takes the staged path."""
    spec = layout.spec
    if not spec.quantized or spec.is_mxfp4 or spec.bits not in (2, 4) or not layout.activation.is_default:
        return False
    names = {slot.name for slot in layout.slots}
    group = spec.group_size
    if "w13.bias" in names or "w2.bias" in names or group % CHUNK or group & (group - 1):
        return False
    w13, w2 = _matrix(layout, "w13"), _matrix(layout, "w2")
    return w13.packed % group == 0 and w2.packed % group == 0 and w13.rows % 2 == 0


_ROUND = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def default_shapes(variant: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The module's block shapes of a variant: (w13's, w2's with the split last)."""
    if variant == "v1":
        return (W13_BLOCK_O, W13_BLOCK_J, W13_WARPS, W13_UNROLL), (W2_BLOCK_O, W2_BLOCK_J, W2_WARPS, W2_UNROLL, W2_SPLIT)
    return {"v2": (V2_W13, V2_W2), "v3": (V3_W13, V3_W2), "v4": (V4_W13, V4_W2)}[variant]


def v4_applies(layout: BlobLayout, dtype: torch.dtype) -> bool:
    """v4's own kernel runs for 2-bit codes and a bf16/fp16 model; elsewhere "v4" runs v1 (fp16
    products miss float32's 1e-4; the 4-bit word arithmetic is not written)."""
    return layout.spec.bits == 2 and dtype in (torch.bfloat16, torch.float16)


class SlotExperts:
    """The expert step of one layer shape on CUDA: `__call__(x, memory, slots, weights, out)`
    adds sum_e weights[e] * expert_{slots[e]}(x) to out, as `gate_up` (w13 and the gate) then
    `down` (w2 and the sum). Scratch buffers are made once (fixed addresses, for CUDA graphs).
    `variant` picks the kernel ("v1": _slot_gemv_kernel, "v2", "v3", "v4": slot_gemv_v2.py, _v3.py, _v4.py;
    "v4" runs v1 where v4_applies says no), `shapes` its
    block shapes (default_shapes(variant) unless given: the bench sweeps them)."""

    def __init__(self, layout: BlobLayout, top_k: int, device: torch.device, dtype: torch.dtype,
                 variant: str = DEFAULT_VARIANT, shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"slot kernel variant {variant!r} (MOE_EDGE_SLOT_KERNEL) is not one of {VARIANTS}")
        if variant == "v4" and not v4_applies(layout, dtype):
            variant, shapes = "v1", None  # v4's fallback: v1, its shapes (v4_applies says why)
        self.layout, self.top_k, self.round, self.variant = layout, top_k, _ROUND[dtype], variant
        self.w13, self.w2 = _matrix(layout, "w13"), _matrix(layout, "w2")
        hidden, ffn = self.w2.rows, self.w13.rows // 2
        shapes13, shapes2 = shapes or default_shapes(variant)
        self.kernel = {"v1": _slot_gemv_kernel, "v2": slot_gemv_v2_kernel, "v3": slot_gemv_v3_kernel,
                       "v4": slot_gemv_v4_kernel}[variant]
        whole_groups = layout.spec.group_size if variant in ("v3", "v4") else 0
        self.blocks13 = _blocks(self.w13, ffn, shapes13, whole_groups)
        self.blocks2, self.split = _blocks(self.w2, hidden, shapes2[:-1], whole_groups), shapes2[-1]
        f32 = dict(dtype=torch.float32, device=device)
        self.x = torch.empty(1, hidden, **f32)  # the input in float32
        self.x_sums = torch.empty(hidden // CHUNK, **f32)  # its sums per CHUNK columns
        self.hidden_act = torch.empty(top_k, ffn, **f32)  # [k, F] silu(gate) * up
        self.hidden_sums = torch.empty(top_k, ffn // CHUNK, **f32)
        self.partial = torch.empty(top_k * self.split, hidden, **f32)  # [k*S, H]
        # v1 sums hidden_act per CHUNK in its w13 epilogue (whole 16-row runs per row block);
        # the others, and v1 at odd shapes, by torch.sum after the launch
        self.sums_in_kernel = variant == "v1" and self.blocks13.rows % CHUNK == 0
        if variant == "v4":  # its inputs as slot_gemv_v4.prepare_input makes them, for w13 and for w2
            group, i32 = layout.spec.group_size, dict(dtype=torch.int32, device=device)
            # the PTX path on the GPU; plain Triton in the interpreter (no inline asm there) or
            # where MOE_EDGE_SLOT_V4_ASM=0 asks for it (to compare)
            self.v4_asm = not interpreted() and os.environ.get("MOE_EDGE_SLOT_V4_ASM", "1") != "0"
            self.v4_factor = v4_input_factors(device)
            self.v4_x = (torch.empty(1, V4_KINDS, self.w13.packed // 4, **i32), torch.empty(1, hidden // group, **f32),
                         torch.empty(1, **f32))
            self.v4_hidden = (torch.empty(top_k, V4_KINDS, self.w2.packed // 4, **i32),
                              torch.empty(top_k, ffn // group, **f32), torch.empty(top_k, **f32))

    def shapes_ran(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The block shapes this runs, fitted to the matrices, as default_shapes spells them."""
        def spelled(blocks: _Blocks) -> tuple[int, ...]:
            fields = (blocks.rows, blocks.bytes, blocks.warps, blocks.unroll)
            return fields + ((blocks.stages,) if self.variant != "v1" else ())
        return spelled(self.blocks13), spelled(self.blocks2) + (self.split,)

    def _launch(self, matrix: _Matrix, blocks: _Blocks, rows: int, split: int, x, x_sums, memory, slots, weights,
                out, *, x_stride: int, gated: bool) -> None:
        """One launch over (row blocks, parts, experts): rows = O of the kernel (F gated, else H).
        v1's gated launch also writes hidden_sums where `sums_in_kernel`."""
        spec = self.layout.spec
        extra = dict(STAGES=blocks.stages) if self.variant != "v1" else {}
        if self.variant == "v1":
            sums = gated and self.sums_in_kernel
            extra.update(out_sums_ptr=self.hidden_sums if sums else out, OUT_SUMS=sums)
        if self.variant == "v4":  # x: its prepared inputs (pairs, group sums, unscale), in place of x and x_sums
            x, x_sums, unscale = x
            extra.update(xscale_ptr=unscale, ASM=self.v4_asm)
        self.kernel[(rows // blocks.rows, split, self.top_k)](
            x, x_sums, memory, slots, weights, out, split,
            X_STRIDE=x_stride, NBYTES=self.layout.nbytes, CODES=matrix.codes, SCALE=matrix.scale, ZERO=matrix.zero,
            O=rows, P=matrix.packed, NG=matrix.groups, WIDTH=spec.bits, GROUP=spec.group_size,
            BLOCK_O=blocks.rows, BLOCK_J=blocks.bytes, GATED=gated, ROUND=self.round, STREAM=STREAM,
            PREFETCH=PREFETCH, UNROLL=blocks.unroll, num_warps=blocks.warps, **extra,
        )

    def gate_up(self, x: torch.Tensor, memory: torch.Tensor, slots: torch.Tensor) -> None:
        """x [1, H] -> hidden_act [k, F] = silu(gate) * up of each chosen expert, and its sums."""
        self.x.copy_(x)
        if self.variant == "v4":
            v4_prepare_input(self.x, self.w13.packed, self.layout.spec.group_size, self.v4_factor, *self.v4_x)
            self.gate_up_kernel(memory, slots)
            v4_prepare_input(self.hidden_act, self.w2.packed, self.layout.spec.group_size, self.v4_factor,
                             *self.v4_hidden)
            return
        torch.sum(self.x.view(-1, CHUNK), dim=1, out=self.x_sums)
        self._gate_up_from_x(memory, slots)

    @property
    def takes_prepared_input(self) -> bool:
        """Whether gate_up_prepared applies: x and x_sums as the w13 launch reads them (v4
        prepares its own input from x, and keeps gate_up)."""
        return self.variant != "v4"

    def gate_up_prepared(self, memory: torch.Tensor, slots: torch.Tensor) -> None:
        """gate_up with self.x and self.x_sums already written (by the MoE input norm:
        decode_fusion.add_rms_norm's x32_out, x_sums_out): the w13 launch, and the hidden sums
        where the kernel does not write them."""
        assert self.takes_prepared_input
        self._gate_up_from_x(memory, slots)

    def _gate_up_from_x(self, memory: torch.Tensor, slots: torch.Tensor) -> None:
        self.gate_up_kernel(memory, slots)
        if not self.sums_in_kernel:
            torch.sum(self.hidden_act.view(self.top_k, -1, CHUNK), dim=2, out=self.hidden_sums)

    def gate_up_kernel(self, memory: torch.Tensor, slots: torch.Tensor) -> None:
        """The w13 launch alone, from self.x and its sums (what the bench times; v1 writes the
        hidden sums too, where sums_in_kernel)."""
        x = self.v4_x if self.variant == "v4" else self.x
        self._launch(self.w13, self.blocks13, self.w13.rows // 2, 1, x, self.x_sums, memory, slots, self.x,
                     self.hidden_act, x_stride=0, gated=True)  # (the gated kernel reads no routing weights: self.x stands in)

    def down(self, memory: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """out [1, H] += sum_e weights[e] * w2_e @ hidden_act[e]."""
        self.down_kernel(memory, slots, weights)
        out.add_(self.partial.sum(0, keepdim=True).to(out.dtype))

    def down_kernel(self, memory: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> None:
        """The w2 launch alone, into the split's partial sums (what the bench times)."""
        x = self.v4_hidden if self.variant == "v4" else self.hidden_act
        self._launch(self.w2, self.blocks2, self.w2.rows, self.split, x, self.hidden_sums, memory,
                     slots, weights, self.partial, x_stride=self.w13.rows // 2, gated=False)

    def __call__(self, x: torch.Tensor, memory: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                 out: torch.Tensor) -> None:
        """x [1, H]; memory [K, nbytes] uint8; slots [k] int64; weights [1, k] float32; out [1, H] += ."""
        self.gate_up(x, memory, slots)
        self.down(memory, slots, weights, out)
