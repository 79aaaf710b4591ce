"""v2 of the slot expert GEMV (slot_experts.py's `_slot_gemv_kernel`: same arguments, same math,
same results to rounding), picked by SlotExperts(variant="v2") or MOE_EDGE_SLOT_KERNEL=v2.

What the compiled v1 does per step (Triton 3.6, sm_90 SASS, scripts/slot_expert_bench.py's shapes):
two LOP3 per code ((c & mask), then | exponent), a PRMT and an IMAD.SHL per byte, so ~2.5
integer ops per code on the half-rate integer pipe, and every load waits in registers (up to
180 registers a thread at BLOCK_O = 128: two programs an SM). v2 changes two things:
- each byte becomes t = byte << 15 | bits(1.0) once, so each code is one AND with (plane mask |
  exponent): v = 1 + c / factor as in v1, ~1.8 integer ops per code instead of ~2.5;
- the loop over steps is a `tl.range(num_stages=STAGES)`: with STAGES > 1 Triton's pipeliner
  moves the codes (and the x and meta loads) through shared memory by cp.async, STAGES - 1
  steps ahead, so a program keeps loads in flight while it computes, without holding them in
  registers (v1's PREFETCH held them in registers and measured worse).
Smaller BLOCK_O then leaves more programs per SM; the bench sweeps both."""

import triton
import triton.language as tl


@triton.jit
def load_codes(pointers, STREAM: tl.constexpr):
    """STREAM: codes are read once, so past L1 (.cg)."""
    if STREAM:
        return tl.load(pointers, cache_modifier=".cg")
    return tl.load(pointers)


@triton.jit
def slot_gemv_v2_kernel(
    x_ptr, x_sums_ptr, memory_ptr, slot_ptr, route_ptr, out_ptr, SPLIT,
    X_STRIDE: tl.constexpr, NBYTES: tl.constexpr, CODES: tl.constexpr, SCALE: tl.constexpr, ZERO: tl.constexpr,
    O: tl.constexpr, P: tl.constexpr, NG: tl.constexpr,
    WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    GATED: tl.constexpr, ROUND: tl.constexpr, STREAM: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, UNROLL: tl.constexpr = 1, STAGES: tl.constexpr = 1,
):
    """_slot_gemv_kernel's interface (PREFETCH accepted and ignored); see the module docstring."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    CHUNKS: tl.constexpr = BLOCK_J // 16
    ONE: tl.constexpr = 0x3F800000  # the bits of 1.0f
    block = tl.program_id(0)
    part = tl.program_id(1)
    expert = tl.program_id(2)
    blob = memory_ptr + tl.multiple_of(tl.load(slot_ptr + expert).to(tl.int64) * NBYTES, 256)
    codes_ptr = blob + CODES
    scale_ptr = (blob + SCALE).to(tl.pointer_type(tl.float16))
    zero_ptr = (blob + ZERO).to(tl.pointer_type(tl.float16))
    x_ptr = x_ptr + expert * X_STRIDE
    x_sums_ptr = x_sums_ptr + expert * (X_STRIDE // 16)
    rows = block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    acc = tl.zeros([BLOCK_O, CHUNKS], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_O, CHUNKS], dtype=tl.float32)
    STEP: tl.constexpr = BLOCK_J * UNROLL
    steps: tl.constexpr = P // STEP
    first_step = part * steps // SPLIT  # the parts share the steps evenly (within one step)
    last_step = (part + 1) * steps // SPLIT
    tile = rows[:, None] * P + tl.arange(0, BLOCK_J)[None, :]  # [BO, BJ]
    meta_base = rows[:, None] * NG + ((tl.arange(0, CHUNKS) * 16) // GROUP)[None, :]  # [BO, BJ/16]
    chunk_base = tl.zeros([BLOCK_O, CHUNKS], dtype=tl.int32) + tl.arange(0, CHUNKS)[None, :]
    for step in tl.range(first_step, last_step, num_stages=STAGES):
        for unrolled in tl.static_range(UNROLL):
            j0 = step * STEP + unrolled * BLOCK_J
            cols = j0 + tl.arange(0, BLOCK_J)  # [BJ]
            codes = load_codes(codes_ptr + tile + j0, STREAM)
            t = codes.to(tl.int32) * 32768 + ONE  # [BO, BJ]: the byte at mantissa bits 15..22 of 1.0
            if GATED:
                t_up = load_codes(codes_ptr + O * P + tile + j0, STREAM).to(tl.int32) * 32768 + ONE
            for k in tl.static_range(PER_BYTE):
                keep = ONE | (((1 << WIDTH) - 1) << (23 - WIDTH * (k + 1)))  # exponent and plane k's bits
                factor = 1 << (WIDTH * (k + 1))
                xk = tl.load(x_ptr + k * P + cols)  # [BJ]
                x_sum = tl.load(x_sums_ptr + (k * P + j0) // 16 + chunk_base)  # [BO, BJ/16]
                meta = meta_base + (k * P + j0) // GROUP
                v = (t & keep).to(tl.float32, bitcast=True)  # 1 + c / factor
                dot = tl.sum(tl.reshape(v * xk[None, :], [BLOCK_O, CHUNKS, 16]), axis=2)  # [BO, BJ/16]
                scale = tl.load(scale_ptr + meta).to(tl.float32)
                zero = tl.load(zero_ptr + meta).to(tl.float32)
                acc += scale * (factor * (dot - x_sum) - zero * x_sum)
                if GATED:
                    v = (t_up & keep).to(tl.float32, bitcast=True)
                    dot = tl.sum(tl.reshape(v * xk[None, :], [BLOCK_O, CHUNKS, 16]), axis=2)
                    scale = tl.load(scale_ptr + meta + O * NG).to(tl.float32)
                    zero = tl.load(zero_ptr + meta + O * NG).to(tl.float32)
                    acc_up += scale * (factor * (dot - x_sum) - zero * x_sum)
    total = tl.sum(acc, axis=1)  # [BO]
    if GATED:
        gate = total.to(ROUND).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(ROUND).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(ROUND).to(tl.float32)
        tl.store(out_ptr + expert * O + rows, (silu * up).to(ROUND).to(out_ptr.dtype.element_ty))
    else:
        weight = tl.load(route_ptr + expert).to(tl.float32)
        tl.store(out_ptr + (expert * SPLIT + part) * O + rows, total * weight)
