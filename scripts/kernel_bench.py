"""Times the fused 2/4-bit GEMV on Mixtral-8x7B expert shapes for several block configs, against
the bytes it must read (codes + scales + zeros) over the device-to-device copy bandwidth.
    python scripts/kernel_bench.py      (on a CUDA machine)"""

import itertools

import torch
import triton

from common.quantization import QuantizedMatrix, QuantSpec, quantized_shapes
from coordinator.runtime.kernels import quantized_linear as ql


def random_matrix(rows, cols, bits, group, device):
    shapes = quantized_shapes(rows, cols, QuantSpec(bits, group))
    planes = (torch.randint(0, 256, shapes["codes.p0"][1], dtype=torch.uint8, device=device),)
    scale = torch.rand(shapes["scale"][1], device=device, dtype=torch.float16) * 0.01
    zero = torch.rand(shapes["zero"][1], device=device, dtype=torch.float16) + 1
    return QuantizedMatrix(planes, scale, zero, bits, group)


def device_copy_gbps(device: torch.device) -> float:
    """GB/s of a 512 MB copy inside device memory, read + write (printed): the yardstick."""
    big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    copy_ms = triton.testing.do_bench(lambda: big[: 1 << 29].copy_(big[1 << 29 :]), return_mode="median")
    peak = 2 * (1 << 29) / copy_ms / 1e6
    print(f"device copy (read+write): {peak:.0f} GB/s")
    return peak


def main():
    device = torch.device("cuda")
    peak = device_copy_gbps(device)
    for bits, (rows, cols) in itertools.product((2, 4), ((28672, 4096), (4096, 14336))):
        matrices = [random_matrix(rows, cols, bits, 64, device) for _ in range(8)]  # rotate: no L2 reuse
        nbytes = sum(t.numel() * t.element_size() for t in (matrices[0].planes[0], matrices[0].scale, matrices[0].zero))
        x = torch.randn(cols, device=device, dtype=torch.bfloat16)
        reference = matrices[0].dequantize(torch.float32) @ x.float()
        for block_o, warps, split in itertools.product((8, 16, 32, 64), (2, 4, 8), (1,)):
            out = torch.empty(rows, device=device, dtype=torch.bfloat16)
            packed = matrices[0].planes[0].shape[1]
            grid = (triton.cdiv(rows, block_o),)

            def run(i=[0]):
                m = matrices[i[0] % 8]
                i[0] += 1
                ql._gemv_kernel[grid](x, m.planes[0], m.scale, m.zero, out, rows, packed, m.scale.shape[1],
                                      WIDTH=bits, GROUP=64, BLOCK_O=block_o, BLOCK_J=ql._block_j(packed, 64), num_warps=warps)
            try:
                ms = triton.testing.do_bench(run, return_mode="median")
            except Exception as err:  # a config that does not compile
                print(f"bits={bits} {rows}x{cols} BO={block_o} warps={warps}: {type(err).__name__}")
                continue
            ql._gemv_kernel[grid](x, matrices[0].planes[0], matrices[0].scale, matrices[0].zero, out, rows, packed,
                                  matrices[0].scale.shape[1], WIDTH=bits, GROUP=64, BLOCK_O=block_o,
                                  BLOCK_J=ql._block_j(packed, 64), num_warps=warps)
            error = ((out.float() - reference).norm() / reference.norm()).item()
            print(f"bits={bits} {rows:>5}x{cols:<5} BO={block_o:<3} warps={warps}: {ms * 1000:7.1f} us "
                  f"{nbytes / ms / 1e6:6.0f} GB/s ({nbytes / ms / 1e6 / peak:4.0%} of copy) err {error:.1e}")


if __name__ == "__main__":
    main()
