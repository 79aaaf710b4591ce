"""v4 of the slot expert GEMV (slot_experts.py's interface and launches), picked by
SlotExperts(variant="v4") or MOE_EDGE_SLOT_KERNEL=v4: 2-bit codes on 32-bit words, two codes per
integer op, multiplied and summed as packed fp16 pairs. For float32 models and for 4-bit codes
SlotExperts runs v1 under this name instead (fp16 products would miss the float32 bound of
tests/slot_expert_check.py; the 4-bit word arithmetic is not written).

Why: at 2 bits v1-v3 are bound by instructions, not by memory. An H200 must take 4.8 TB/s x 4
codes a byte = 19.2e12 codes/s, over 132 SMs x ~1.98 GHz that is ~73 codes per SM clock, and an
SM issues 128 thread-instructions a clock (4 schedulers x 32 lanes), only 64 of them integer ops.
So a code may cost ~1.7 instructions in all, ~0.9 of them integer. v1 spends ~4-5.

The trick: fp16 subnormals. A 16-bit half whose exponent bits are zero is m * 2**-24 exactly,
for any mantissa m (bits 0-9), and the GPU's fp16 FMA takes subnormals at full rate (no .ftz).
So masking two codes out of a word, in place, *is* the pair of fp16 values c * 2**(s-24) (s the
codes' bit position inside their halves): one AND per two codes, no OR, no bias to subtract
(the exponent trick's 1.0 would swamp c * x in fp16), no shift where s <= 8. The input is
handed in as fp16 pairs pre-scaled by 2**(24 - s - n_k) per position (and normalized per token
by a power of two, 2**-e, so |x_n| < 1), so every product of plane k is c * x_n * 2**-n_k
whatever the position, and all the codes of a plane add into one accumulator; n_k = 9 - (the
plane's smallest s) = 3, 3, 5, 5 keeps the pairs <= 2**15 and the products as far above fp16's
subnormal range as the positions allow.

Layout (planar, as v1's docstring says): byte j of a plane row holds the codes of input columns
k * P + j, plane k at bits 6-2k..7-2k. An int32 word q holds bytes 4q..4q+3: half 0 = bytes 0
(bits 0-7) and 1 (bits 8-15), half 1 = bytes 2 and 3. Without a shift, byte 0's four codes sit
at half-bits s = 6, 4, 2, 0 (planes 0-3) and byte 1's plane-3 code at s = 8, all inside the
10-bit mantissa; byte 1's planes 0-2 (half-bits 14, 12, 10) come down by one shift of the word
right by 6 (to s = 8, 6, 4), and byte 0's planes 1-3 go up by one shift left by 4 (to s = 8, 6,
4; plane 3 at s = 0 would need products 64x smaller). Halves 0 and 1 alike, so each AND gives
the pair (byte b, byte b+2), input columns (k*P + 4q + b, k*P + 4q + b + 2), and the input pair
of fp16 matches. A word:
    2 SHF + 8 LOP3 (AND) + 8 HFMA2 = 18 instructions for 16 codes = 1.13 a code,
of which 10 integer (0.63 a code) and 8 fp16x2 FMA (the FMA pipe: 128 a clock for fp16x2).
Around it, per thread: one 16-byte load per 4 words (64 codes) and its address, 8 16-byte loads
of the input pairs per 4 words shared by the thread's rows (BLOCK_O * BLOCK_J / 16 / (32 *
warps) of them), and per group (256 codes of a row: 64 per plane) four fp16x2 -> f32 sums
(2 CVT + 1 FADD each), four scale and zero loads and ~3 FP32 ops per plane: ~0.15 a code. So
~1.3-1.4 instructions a code expected (v1: ~4-5), ~0.7 of them integer: within the 1.7 and 0.9
an H200 needs for its bandwidth.

Counted in the SASS of an offline sm_90 compile (Triton 3.9's ptxas, no GPU; Mixtral-8x7B's
shapes, bf16; the loop body per trip over codes per trip and thread):
    v4 w13 (64, 64, 4, 1, 1): 1450 / 1024 = 1.42 a code, 0.70 integer (512 HFMA2, 518 LOP3,
       105 SHF, 84 LDG of which 64 are 16-byte, 64 HADD2.F32 for the fp16 -> f32 sums, 45 IMAD,
       32 FFMA, 16 FMUL); 92 registers;
    v4 w2 (128, 32, 4, 1, 1): 807 / 512 = 1.58, 0.82 integer counting IMAD (no gate/up pair to
       share the input loads); at 256 rows a block 1.45; with STAGES = 2 (cp.async) ~0.1-0.4 more;
    v1 w13 (128, 64, 4, 1): 2186 / 512 = 4.3; v1 w2 (16, 256, 4, 1): 641 / 128 = 5.0;
    v3 w13 (32, 64, 4, 1, 1): 1911 / 512 = 3.7; v3 w2 (64, 32, 4, 1, 2): 1125 / 256 = 4.4.
The plain-Triton path (ASM=False) compiles to nearly the same loop on sm_90 (LLVM finds the
HFMA2; 1.67 a code for w13, PRMTs for the bitcasts) but rounds the product before the add
unless the compiler fuses it. Whether the GPU reaches the bandwidth now depends on latency
hiding (occupancy), which only the bench on an H200 can say.

Precision: a product c * x_n * 2**-n_k is rounded once to fp16 (2**-11 relative, the FMA is
fused), the accumulator holds one plane's part of a group for one thread (32 products a half,
|c x_n 2**-n_k| <= 3/8: at most 12, no overflow; products of inputs below ~2**-9 to 2**-11 of
the token's largest reach fp16's subnormals, absolute 2**-25), then the sum goes to float32,
is brought to units of 2**-9 and scaled and zero-folded as in v1:
sum W x = scale * (sum c x - zero * sum x), with the group sums of the same rounded x_n (so
the fp16 rounding of the input is that of a plain fp16 GEMV). The input itself is rounded to
fp16 after normalizing: 2**-12 relative, fine for bf16/fp16 models, not for float32's 1e-4. In
the interpreter (fp16 model, hidden 256) v4 missed float64 by 2e-3 where v1 missed by 5e-4,
also with one input 2000x the others (2.5e-3); the bound is 3e-2.

Shape of the work as in v3: BLOCK_J / 16 threads share a row, each over a run of whole groups
(UNROLL groups a trip, a tl.range of STAGES), so the scales, zeros and sums come once per group
in the products' own layout; each thread reads its group 16 bytes (4 words) at a time.

ASM (constexpr): True runs the word arithmetic as PTX (tl.inline_asm_elementwise: shr.u32,
and.b32, fma.rn.f16x2, cvt); False, the same math in plain Triton ops on the fp16 halves
(bitcasts, two roundings for the FMA instead of one), which is what the CPU interpreter runs
(it cannot run inline asm) and what tests/slot_expert_check.py checks there. The PTX path is
vouched for only by a GPU run of that check."""

import torch
import triton
import triton.language as tl

# half-bit position s of each (plane k, byte pair) as read by the kernel: pair A = bytes (0, 2),
# from the word as loaded (plane 0) or shifted left by 4 (planes 1-3); pair B = bytes (1, 3),
# from the word shifted right by 6 (planes 0-2) or as loaded (plane 3)
S_A = (6, 8, 6, 4)
S_B = (8, 6, 4, 8)
# products of plane k are c * x_n * 2**-PLANE_NORM[k]: as large as the smallest s of the plane
# lets its input pairs be (x_n * 2**(24 - s - n) <= 2**15, so n = 9 - min s), which keeps them
# far from fp16's subnormal range (down to 2**-14) for the small inputs of a token with outliers
PLANE_NORM = tuple(9 - min(a, b) for a, b in zip(S_A, S_B))  # (3, 3, 5, 5); the kernel spells it 3 + 2 * (k // 2)
NORM = 9  # the group sums are of x_n * 2**-NORM, and the kernel brings each plane's sum to that
KINDS = 8  # input pairs per word: (A, B) for each of the four planes


def input_factors(device: torch.device) -> torch.Tensor:
    """[4, 2] fp16: 2**(24 - s - PLANE_NORM[k]) for (plane k, pair A/B), what prepare_input
    scales x_n by (at most 2**15). Made
    once, outside any CUDA graph (a tensor from host values is a copy a capture refuses)."""
    shift = torch.tensor([[24 - s - PLANE_NORM[k] for s in (S_A[k], S_B[k])] for k in range(4)], dtype=torch.float32)
    return torch.pow(2.0, shift).half().to(device)


def prepare_input(x: torch.Tensor, packed: int, group: int, factor: torch.Tensor, pairs: torch.Tensor,
                  sums: torch.Tensor, unscale: torch.Tensor) -> None:
    """x [E, 4P] (any float dtype; E inputs) -> the kernel's inputs, written into the given
    buffers (fixed addresses, for CUDA graphs; device ops only, no host sync); factor:
    input_factors(x.device):
      pairs [E, 8, P/4] int32: pair kind 2k + (0: A, 1: B) of word q, as fp16 halves
            (x_n[kP + 4q + b], x_n[kP + 4q + b + 2]) * factor[k, A/B], b = 0 for A, 1 for B;
      sums [E, 4P / group] float32: per group, sum x_n * 2**-NORM (x_n as rounded to fp16);
      unscale [E] float32: 2**(e + NORM), what the kernel's sums are multiplied by.
    x_n = x * 2**-e with e the exponent of max |x| (so |x_n| < 1)."""
    x = x.float()
    rows = x.shape[0]
    amax = x.abs().amax(dim=1)  # [E]
    exponent = torch.frexp(amax).exponent  # amax = m * 2**e, 0.5 <= m < 1 (e = 0 for amax = 0)
    xn = (x * torch.pow(2.0, -exponent.float())[:, None]).half()  # [E, I], |x_n| < 1
    sums.copy_((xn.float() * 2.0**-NORM).view(rows, -1, group).sum(dim=2))
    unscale.copy_(torch.pow(2.0, (exponent + NORM).float()))
    words = packed // 4
    planes = xn.view(rows, 4, words, 4)  # [E, k, q, byte]
    a = planes[..., 0::2] * factor[None, :, 0, None, None]  # [E, k, q, 2]: bytes 0, 2 (exact: powers of 2)
    b = planes[..., 1::2] * factor[None, :, 1, None, None]  # bytes 1, 3
    halves = torch.stack((a, b), dim=2).contiguous()  # [E, k, A/B, q, 2] fp16
    pairs.copy_(halves.view(torch.int32).view(rows, KINDS, words))


@triton.jit
def _lo(v):
    """The low fp16 half of int32 words."""
    return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _hi(v):
    return (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pack(lo, hi):
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _hfma2(a, b, c):
    """Plain Triton: a * b + c on fp16 pairs held in int32 words (two roundings, not one)."""
    return _pack(_lo(a) * _lo(b) + _lo(c), _hi(a) * _hi(b) + _hi(c))


@triton.jit
def _word(w, xw, acc0, acc1, acc2, acc3, ASM: tl.constexpr):
    """One word of codes (16 codes, four planes) into the four planes' fp16x2 accumulators; xw:
    the word's 8 input pairs (A, B of plane 0, then of plane 1, ...)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 u, s, m, r0, r1, r2, r3;
            shl.b32 u, $4, 4;
            shr.u32 s, $4, 6;
            and.b32 m, $4, 0x00C000C0;
            fma.rn.f16x2 r0, m, $5, $13;
            and.b32 m, s, 0x03000300;
            fma.rn.f16x2 r0, m, $6, r0;
            and.b32 m, u, 0x03000300;
            fma.rn.f16x2 r1, m, $7, $14;
            and.b32 m, s, 0x00C000C0;
            fma.rn.f16x2 r1, m, $8, r1;
            and.b32 m, u, 0x00C000C0;
            fma.rn.f16x2 r2, m, $9, $15;
            and.b32 m, s, 0x00300030;
            fma.rn.f16x2 r2, m, $10, r2;
            and.b32 m, u, 0x00300030;
            fma.rn.f16x2 r3, m, $11, $16;
            and.b32 m, $4, 0x03000300;
            fma.rn.f16x2 r3, m, $12, r3;
            mov.b32 $0, r0;
            mov.b32 $1, r1;
            mov.b32 $2, r2;
            mov.b32 $3, r3;
            }
            """,
            constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            args=[w, xw[0], xw[1], xw[2], xw[3], xw[4], xw[5], xw[6], xw[7], acc0, acc1, acc2, acc3],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    u = w << 4
    s = w >> 6  # (arithmetic: the sign's copies land in bits 26-31, which no mask below keeps)
    acc0 = _hfma2(s & 0x03000300, xw[1], _hfma2(w & 0x00C000C0, xw[0], acc0))
    acc1 = _hfma2(s & 0x00C000C0, xw[3], _hfma2(u & 0x03000300, xw[2], acc1))
    acc2 = _hfma2(s & 0x00300030, xw[5], _hfma2(u & 0x00C000C0, xw[4], acc2))
    acc3 = _hfma2(w & 0x03000300, xw[7], _hfma2(u & 0x00300030, xw[6], acc3))
    return acc0, acc1, acc2, acc3


@triton.jit
def _pair_sum(v, ASM: tl.constexpr):
    """float32 lo + hi of fp16x2 words."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .f16 l, h;
            .reg .f32 a, b;
            mov.b32 {l, h}, $1;
            cvt.f32.f16 a, l;
            cvt.f32.f16 b, h;
            add.f32 $0, a, b;
            }
            """,
            constraints="=f,r", args=[v], dtype=tl.float32, is_pure=True, pack=1)
    return _lo(v).to(tl.float32) + _hi(v).to(tl.float32)


@triton.jit
def _split4(t, D0: tl.constexpr, D1: tl.constexpr):
    """[D0, D1, 4] -> its four [D0, D1] slices along the last axis (in-thread: a 16-byte vector)."""
    even, odd = tl.split(tl.reshape(t, [D0, D1, 2, 2]))  # even: elements 0, 2; odd: 1, 3
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _chunk(words, x0, x1, x2, x3, acc0, acc1, acc2, acc3, BLOCK_O: tl.constexpr, SHARE: tl.constexpr,
           ASM: tl.constexpr):
    """4 words of each (row, run) [BO, S, 4] and their inputs (x_i: the 8 pair kinds of word i,
    each [1, S]) into the planes' accumulators [BO, S]."""
    w0, w1, w2, w3 = _split4(words, BLOCK_O, SHARE)
    acc0, acc1, acc2, acc3 = _word(w0, x0, acc0, acc1, acc2, acc3, ASM)
    acc0, acc1, acc2, acc3 = _word(w1, x1, acc0, acc1, acc2, acc3, ASM)
    acc0, acc1, acc2, acc3 = _word(w2, x2, acc0, acc1, acc2, acc3, ASM)
    acc0, acc1, acc2, acc3 = _word(w3, x3, acc0, acc1, acc2, acc3, ASM)
    return acc0, acc1, acc2, acc3


@triton.jit
def slot_gemv_v4_kernel(
    x_ptr, x_sums_ptr, memory_ptr, slot_ptr, route_ptr, out_ptr, SPLIT,
    X_STRIDE: tl.constexpr, NBYTES: tl.constexpr, CODES: tl.constexpr, SCALE: tl.constexpr, ZERO: tl.constexpr,
    O: tl.constexpr, P: tl.constexpr, NG: tl.constexpr,
    WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    GATED: tl.constexpr, ROUND: tl.constexpr, STREAM: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, UNROLL: tl.constexpr = 1, STAGES: tl.constexpr = 1,
    xscale_ptr=None, ASM: tl.constexpr = True,
):
    """_slot_gemv_kernel's interface with its inputs as prepare_input makes them: x_ptr the pairs
    int32 [*, 8, P/4], x_sums_ptr the group sums [*, 4P / GROUP], xscale_ptr the unscale [*]
    (X_STRIDE: 0 for one input shared by the experts, else one per expert; WIDTH must be 2,
    STREAM and PREFETCH are accepted and not used). BLOCK_J / 16 threads share a row, each a run
    of whole groups, as in v3; see the module docstring."""
    tl.static_assert(WIDTH == 2, "v4 is written for 2-bit codes")
    WORDS: tl.constexpr = P // 4  # int32 words of a plane row
    GROUP_CHUNKS: tl.constexpr = GROUP // 16  # 16-byte chunks (4 words) of a group in a plane row
    SHARE: tl.constexpr = BLOCK_J // 16  # threads per row
    RUN: tl.constexpr = P // SHARE  # bytes of a row that one thread takes
    block = tl.program_id(0)
    part = tl.program_id(1)
    expert = tl.program_id(2)
    blob = memory_ptr + tl.multiple_of(tl.load(slot_ptr + expert).to(tl.int64) * NBYTES, 256)
    words_ptr = (blob + CODES).to(tl.pointer_type(tl.int32))
    scale_ptr = (blob + SCALE).to(tl.pointer_type(tl.float16))
    zero_ptr = (blob + ZERO).to(tl.pointer_type(tl.float16))
    if X_STRIDE == 0:
        source = 0  # one input for every expert
    else:
        source = expert
    x_ptr = x_ptr + source * (8 * WORDS)
    x_sums_ptr = x_sums_ptr + source * (4 * P // GROUP)
    rows = block * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    runs = tl.arange(0, SHARE) * RUN  # [S]: where each sharing thread's run starts in a plane row (bytes)
    # word offsets built from constant multiples only, so that the compiler sees 4 aligned,
    # contiguous words (one 16-byte load) and keeps them in one thread, as the splits want
    run_words = tl.arange(0, SHARE) * (RUN // 4)  # [S]
    tile = rows[:, None, None] * WORDS + run_words[None, :, None] + tl.arange(0, 4)[None, None, :]  # [BO, S, 4]
    x_tile = run_words[:, None] + tl.arange(0, 4)[None, :]  # [S, 4]
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
            w0 = step * (STEP // 4) + unrolled * (GROUP // 4)  # and its first word
            zero16 = tl.zeros([BLOCK_O, SHARE], dtype=tl.int32)  # fp16x2 (0, 0)
            g0, g1, g2, g3 = zero16, zero16, zero16, zero16  # per plane: sum c * x_n * 2**-9 (fp16x2)
            u0, u1, u2, u3 = zero16, zero16, zero16, zero16
            for c in tl.static_range(GROUP_CHUNKS):
                q0 = w0 + 4 * c  # the chunk's first word in each run
                xs = ()  # per word of the chunk: its 8 pair kinds, each [1, S]
                for kind in tl.static_range(8):
                    xs = xs + (tl.load(x_ptr + kind * WORDS + q0 + x_tile)[None, :, :],)
                x0a, x1a, x2a, x3a = _split4(xs[0], 1, SHARE)
                x0b, x1b, x2b, x3b = _split4(xs[1], 1, SHARE)
                x0c, x1c, x2c, x3c = _split4(xs[2], 1, SHARE)
                x0d, x1d, x2d, x3d = _split4(xs[3], 1, SHARE)
                x0e, x1e, x2e, x3e = _split4(xs[4], 1, SHARE)
                x0f, x1f, x2f, x3f = _split4(xs[5], 1, SHARE)
                x0g, x1g, x2g, x3g = _split4(xs[6], 1, SHARE)
                x0h, x1h, x2h, x3h = _split4(xs[7], 1, SHARE)
                x0 = (x0a, x0b, x0c, x0d, x0e, x0f, x0g, x0h)  # word 0's kinds
                x1 = (x1a, x1b, x1c, x1d, x1e, x1f, x1g, x1h)
                x2 = (x2a, x2b, x2c, x2d, x2e, x2f, x2g, x2h)
                x3 = (x3a, x3b, x3c, x3d, x3e, x3f, x3g, x3h)
                words = tl.load(words_ptr + tile + q0)  # [BO, S, 4]
                g0, g1, g2, g3 = _chunk(words, x0, x1, x2, x3, g0, g1, g2, g3, BLOCK_O, SHARE, ASM)
                if GATED:
                    words_up = tl.load(words_ptr + O * WORDS + tile + q0)
                    u0, u1, u2, u3 = _chunk(words_up, x0, x1, x2, x3, u0, u1, u2, u3, BLOCK_O, SHARE, ASM)
            gs = (g0, g1, g2, g3)
            us = (u0, u1, u2, u3)
            for k in tl.static_range(4):
                meta = meta_tile + (k * P + j0) // GROUP  # [BO, S]
                x_sum = tl.load(x_sums_ptr + (k * P + runs + j0) // GROUP)[None, :]  # [1, S]
                scale = tl.load(scale_ptr + meta).to(tl.float32)
                zero = tl.load(zero_ptr + meta).to(tl.float32)
                to_norm = 1.0 / (1 << (6 - 2 * (k // 2)))  # 2**(PLANE_NORM[k] - NORM): plane k in units of 2**-NORM
                acc += scale * (_pair_sum(gs[k], ASM) * to_norm - zero * x_sum)  # sum over the group of W x_n 2**-9
                if GATED:
                    scale = tl.load(scale_ptr + meta + O * NG).to(tl.float32)
                    zero = tl.load(zero_ptr + meta + O * NG).to(tl.float32)
                    acc_up += scale * (_pair_sum(us[k], ASM) * to_norm - zero * x_sum)
    unscale = tl.load(xscale_ptr + source)
    total = tl.sum(acc, axis=1) * unscale  # [BO]
    if GATED:  # rounded where the plain path rounds: gate and up, silu(gate), the product
        gate = total.to(ROUND).to(tl.float32)
        up = (tl.sum(acc_up, axis=1) * unscale).to(ROUND).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(ROUND).to(tl.float32)
        tl.store(out_ptr + expert * O + rows, (silu * up).to(ROUND).to(out_ptr.dtype.element_ty))
    else:
        weight = tl.load(route_ptr + expert).to(tl.float32)
        tl.store(out_ptr + (expert * SPLIT + part) * O + rows, total * weight)
