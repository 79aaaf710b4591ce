"""Experiment: GEMV variants for the 2/4-bit planar codes on Mixtral-8x7B shapes (not used by the
engine until one wins; see NOTES in BENCHMARKS.md). Run on a CUDA machine."""

import itertools

import torch
import triton
import triton.language as tl

from coordinator.runtime.kernels import quantized_linear as ql
from scripts.kernel_bench import random_matrix


@triton.jit
def gemv_v2(x_ptr, codes_ptr, scale_ptr, zero_ptr, out_ptr, O, P, NG,
            WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_O: tl.constexpr, SPLIT: tl.constexpr):
    """One group per plane per step (BLOCK_J = GROUP: no reshapes); codes become floats by the
    exponent trick (OR into 2**23, subtract) instead of int->float conversions; SPLIT programs
    share a row block along the input and add with atomics into a float32 output."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    MASK: tl.constexpr = (1 << WIDTH) - 1
    pid = tl.program_id(0)
    part = tl.program_id(1)
    rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < O
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    steps = P // GROUP
    per_part = tl.cdiv(steps, SPLIT)
    for step in range(part * per_part, tl.minimum((part + 1) * per_part, steps)):
        j0 = step * GROUP
        cols = j0 + tl.arange(0, GROUP)
        packed = tl.load(codes_ptr + rows[:, None] * P + cols[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
        for k in tl.static_range(PER_BYTE):
            bits = ((packed >> (8 - WIDTH * (k + 1))) & MASK) | 0x4B000000
            codes = bits.to(tl.float32, bitcast=True) - 8388608.0
            xk = tl.load(x_ptr + k * P + cols).to(tl.float32)
            dot = tl.sum(codes * xk[None, :], axis=1)
            x_sum = tl.sum(xk, axis=0)
            g = (k * P + j0) // GROUP
            scale = tl.load(scale_ptr + rows * NG + g, mask=row_ok, other=0).to(tl.float32)
            zero = tl.load(zero_ptr + rows * NG + g, mask=row_ok, other=0).to(tl.float32)
            acc += scale * (dot - zero * x_sum)
    if SPLIT == 1:
        tl.store(out_ptr + rows, acc, mask=row_ok)
    else:
        tl.atomic_add(out_ptr + rows, acc, mask=row_ok)


def main():
    device = torch.device("cuda")
    for bits, (rows, cols) in itertools.product((2, 4), ((28672, 4096), (4096, 14336))):
        matrices = [random_matrix(rows, cols, bits, 64, device) for _ in range(8)]
        nbytes = sum(t.numel() * t.element_size() for t in (matrices[0].planes[0], matrices[0].scale, matrices[0].zero))
        x = torch.randn(cols, device=device, dtype=torch.bfloat16)
        reference = matrices[0].dequantize(torch.float32) @ x.float()
        packed = matrices[0].planes[0].shape[1]
        results = []
        for block_o, warps, split in itertools.product((8, 16, 32), (1, 2, 4), (1, 2, 4, 8)):
            out = torch.zeros(rows, device=device, dtype=torch.float32)
            grid = (triton.cdiv(rows, block_o), split)

            def run(i=[0]):
                m = matrices[i[0] % 8]
                i[0] += 1
                if split > 1:
                    out.zero_()
                gemv_v2[grid](x, m.planes[0], m.scale, m.zero, out, rows, packed, m.scale.shape[1],
                              WIDTH=bits, GROUP=64, BLOCK_O=block_o, SPLIT=split, num_warps=warps)
            try:
                ms = triton.testing.do_bench(run, return_mode="median")
                out.zero_()
                gemv_v2[grid](x, matrices[0].planes[0], matrices[0].scale, matrices[0].zero, out, rows, packed,
                              matrices[0].scale.shape[1], WIDTH=bits, GROUP=64, BLOCK_O=block_o, SPLIT=split, num_warps=warps)
            except Exception as err:
                print(f"bits={bits} {rows}x{cols} BO={block_o} w={warps} split={split}: {type(err).__name__}: {str(err)[:80]}")
                continue
            error = ((out - reference).norm() / reference.norm()).item()
            results.append((ms, block_o, warps, split, error))
        results.sort()
        for ms, block_o, warps, split, error in results[:4]:
            print(f"v2 bits={bits} {rows:>5}x{cols:<5} BO={block_o:<3} warps={warps} split={split}: {ms * 1000:6.1f} us "
                  f"{nbytes / ms / 1e6:6.0f} GB/s err {error:.1e}")


if __name__ == "__main__":
    main()
