"""v3 of the slot expert GEMV (slot_experts.py's `_slot_gemv_kernel`: same arguments, same math),
picked by SlotExperts(variant="v3") or MOE_EDGE_SLOT_KERNEL=v3.

v2 keeps v1's shape of work: a step of BLOCK_J bytes per row, each 16-byte chunk of it scaled on
its own, so every chunk costs each plane a scale, a zero and an x-sum load, and at BLOCK_J > 16
the compiled loop moves those [BO, BJ/16] tensors between layouts through shared memory (24
barriers a step at BLOCK_O = 32, BLOCK_J = 64, per the sm_90 SASS). v3 gives each thread whole
groups of its rows instead: a trip is UNROLL groups (GROUP bytes of every row, read 16 at a
time), the dot of each plane is summed over the group's chunks in registers (a tuple of
PER_BYTE [BO, S] sums), and the group's scale and zero are loaded once
per row and plane, the x sums once per group ([BO, S] and [S] loads in the products' own
layout: no layout change, no barrier in the loop). Each code is one AND as in v2, and the loop
is a tl.range(num_stages=STAGES) as in v2. S = BLOCK_J / 16 threads share a row, each over its
own run of whole groups (more threads for a matrix of few rows; their sums meet once, at the
end), so BLOCK_O * S = 32 * warps gives each thread one row."""

import triton
import triton.language as tl


@triton.jit
def slot_gemv_v3_kernel(
    x_ptr, x_sums_ptr, memory_ptr, slot_ptr, route_ptr, out_ptr, SPLIT,
    X_STRIDE: tl.constexpr, NBYTES: tl.constexpr, CODES: tl.constexpr, SCALE: tl.constexpr, ZERO: tl.constexpr,
    O: tl.constexpr, P: tl.constexpr, NG: tl.constexpr,
    WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    GATED: tl.constexpr, ROUND: tl.constexpr, STREAM: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, UNROLL: tl.constexpr = 1, STAGES: tl.constexpr = 1,
):
    """_slot_gemv_kernel's interface (PREFETCH accepted and not used; UNROLL counts groups per
    trip); see the module docstring. BLOCK_J / 16 threads share a row: each takes its own run of
    P * 16 / BLOCK_J bytes (whole groups), and their sums meet once, at the end."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    GROUP_CHUNKS: tl.constexpr = GROUP // 16
    SHARE: tl.constexpr = BLOCK_J // 16  # threads per row
    RUN: tl.constexpr = P // SHARE  # bytes of a row that one thread takes
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
    runs = tl.arange(0, SHARE) * RUN  # [S]: where each sharing thread's run starts in a plane row
    tile = rows[:, None, None] * P + runs[None, :, None] + tl.arange(0, 16)[None, None, :]  # [BO, S, 16]
    x_tile = runs[:, None] + tl.arange(0, 16)[None, :]  # [S, 16]
    meta_tile = rows[:, None] * NG + (runs // GROUP)[None, :]  # [BO, S]
    acc = tl.zeros([BLOCK_O, SHARE], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_O, SHARE], dtype=tl.float32)
    STEP: tl.constexpr = GROUP * UNROLL
    steps: tl.constexpr = RUN // STEP
    first_step = part * steps // SPLIT  # the parts share the steps evenly (within one step)
    last_step = (part + 1) * steps // SPLIT
    for step in tl.range(first_step, last_step, num_stages=STAGES):
        for unrolled in tl.static_range(UNROLL):
            j0 = step * STEP + unrolled * GROUP  # the group's first byte in each run
            dots = ()  # per plane: sum over the group of (v - 1) * x, chunk by chunk
            dots_up = ()
            x_group = ()  # per plane: the group's x sum
            for k in tl.static_range(PER_BYTE):
                dots = dots + (tl.zeros([BLOCK_O, SHARE], dtype=tl.float32),)
                dots_up = dots_up + (tl.zeros([BLOCK_O, SHARE], dtype=tl.float32),)
                x_group = x_group + (tl.zeros([SHARE], dtype=tl.float32),)
            for c in tl.static_range(GROUP_CHUNKS):
                t = (tl.load(codes_ptr + tile + j0 + 16 * c).to(tl.int32) << 15) | ONE  # [BO, S, 16]
                if GATED:
                    t_up = (tl.load(codes_ptr + O * P + tile + j0 + 16 * c).to(tl.int32) << 15) | ONE
                new, new_up, new_x = (), (), ()
                for k in tl.static_range(PER_BYTE):
                    keep = ONE | (((1 << WIDTH) - 1) << (23 - WIDTH * (k + 1)))  # exponent and plane k's bits
                    xk = tl.load(x_ptr + k * P + j0 + 16 * c + x_tile)[None, :, :]  # [1, S, 16]
                    x_sum = tl.load(x_sums_ptr + (k * P + runs + j0) // 16 + c)  # [S]: the chunks' x sums
                    v = (t & keep).to(tl.float32, bitcast=True)  # 1 + c / factor
                    new = new + (dots[k] + (tl.sum(v * xk, axis=2) - x_sum[None, :]),)  # [BO, S]
                    if GATED:
                        v = (t_up & keep).to(tl.float32, bitcast=True)
                        new_up = new_up + (dots_up[k] + (tl.sum(v * xk, axis=2) - x_sum[None, :]),)
                    new_x = new_x + (x_group[k] + x_sum,)
                dots, dots_up, x_group = new, new_up, new_x
            for k in tl.static_range(PER_BYTE):
                factor = 1 << (WIDTH * (k + 1))
                meta = meta_tile + (k * P + j0) // GROUP  # [BO, S]
                scale = tl.load(scale_ptr + meta).to(tl.float32)
                zero = tl.load(zero_ptr + meta).to(tl.float32)
                acc += scale * (factor * dots[k] - zero * x_group[k][None, :])  # sum over the group of W x
                if GATED:
                    scale = tl.load(scale_ptr + meta + O * NG).to(tl.float32)
                    zero = tl.load(zero_ptr + meta + O * NG).to(tl.float32)
                    acc_up += scale * (factor * dots_up[k] - zero * x_group[k][None, :])
    total = tl.sum(acc, axis=1)  # [BO]
    if GATED:  # rounded where the plain path rounds: gate and up, silu(gate), the product
        gate = total.to(ROUND).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(ROUND).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(ROUND).to(tl.float32)
        tl.store(out_ptr + expert * O + rows, (silu * up).to(ROUND).to(out_ptr.dtype.element_ty))
    else:
        weight = tl.load(route_ptr + expert).to(tl.float32)
        tl.store(out_ptr + (expert * SPLIT + part) * O + rows, total * weight)
