"""Times the prompt path's dequantize kernel (codes -> bf16 weight, then one matmul) on
Mixtral-8x7B expert shapes for several tiles, against the bytes it moves (codes, scales and zeros
read; the bf16 weight written) over the device-to-device copy rate.
    python -m scripts.dequantize_bench      (on a CUDA machine)"""

import itertools

import torch
import triton

from coordinator.runtime.kernels import quantized_linear as ql
from scripts.kernel_bench import device_copy_gbps, random_matrix


def main() -> None:
    device = torch.device("cuda")
    peak = device_copy_gbps(device)
    print(f"{'bits':>4} {'shape':>12} {'block_o':>7} {'warps':>5} {'us':>8} {'GB/s':>7} {'of copy':>7}")
    for bits, (rows, cols) in itertools.product((2, 4), ((28672, 4096), (4096, 14336))):
        matrices = [random_matrix(rows, cols, bits, 64, device) for _ in range(4)]  # rotate: no L2 reuse
        m0 = matrices[0]
        moved = sum(t.numel() * t.element_size() for t in (m0.planes[0], m0.scale, m0.zero)) + rows * cols * 2
        out = torch.empty(rows, cols, dtype=torch.bfloat16, device=device)
        exact = m0.dequantize(torch.float32).to(torch.bfloat16)
        for block_o, warps in itertools.product((8, 16, 32), (4, 8)):
            ql.DEQUANTIZE_BLOCK_O, ql.DEQUANTIZE_WARPS = block_o, warps
            ql.dequantize(m0, torch.bfloat16, out)
            assert torch.equal(out, exact), (bits, rows, cols, block_o, warps)
            turn = [0]

            def run():
                turn[0] += 1
                ql.dequantize(matrices[turn[0] % 4], torch.bfloat16, out)

            us = triton.testing.do_bench(run, return_mode="median") * 1000
            print(f"{bits:>4} {rows:>5}x{cols:<6} {block_o:>7} {warps:>5} {us:>8.1f} {moved / us / 1e3:>7.0f} {moved / us / 1e3 / peak:>7.0%}")


if __name__ == "__main__":
    main()
