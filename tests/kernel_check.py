"""Checks the fused kernels against plain dequantize+matmul on random inputs; run by
tests/test_kernels.py, on the GPU or (TRITON_INTERPRET=1) on the CPU. Prints the seed first
(rerun a failure with `python -m tests.kernel_check DEVICE SEED`, with TRITON_INTERPRET=1 for
the CPU), then one line per case, and exits non-zero on a miss. Not collected by pytest (no test_ prefix)."""

import sys

import torch

from common.quantization import QuantSpec, quantize_matrix
from coordinator.runtime.kernels import quantized_linear as kernels
from tests.check_seed import device_and_seed, seeded

BOUND = 1e-2  # relative L2 error in fp16/bf16 (fp32 lands far below it)
# (rows, columns, group). The interpreter runs every program of the grid in Python, so the CPU
# gets two small shapes that still meet every case the GPU's three do: rows not a multiple of the
# row block (masking), several groups per step, and (4-bit, 1024 columns) several steps per row.
SHAPES = {"cuda": [(96, 128, 32), (256, 512, 64), (520, 1024, 64)], "cpu": [(40, 128, 32), (24, 1024, 64)]}
TOKENS = (1, 3, 17)  # one and a few tokens take the fused GEMV, 17 the dequantize kernel + matmul


def main(device: str, dtypes: list[torch.dtype], seed: int) -> int:
    generator = seeded("tests.kernel_check", device, seed)
    failures = 0
    for bits in (2, 4):
        for rows, columns, group in SHAPES[device]:
            weight = torch.randn(rows, columns, generator=generator) * 0.02
            matrix = quantize_matrix(weight, QuantSpec(bits, group))
            on_device = type(matrix)(tuple(p.to(device) for p in matrix.planes), matrix.scale.to(device),
                                     matrix.zero.to(device), bits, group)
            assert kernels.supports(on_device)
            for dtype in dtypes:
                for tokens in TOKENS:
                    x = torch.randn(tokens, columns, generator=generator).to(device=device, dtype=dtype)
                    reference = x.double() @ on_device.dequantize(torch.float32).double().T
                    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=device)
                    out.copy_(kernels.quantized_linear(x, on_device))
                    error = ((out.double() - reference).norm() / reference.norm()).item()
                    ok = error < BOUND and not torch.isnan(out).any()
                    failures += not ok
                    print(f"bits={bits} {rows}x{columns} g{group} {str(dtype):>14} T={tokens:<3} rel err {error:.2e} {'ok' if ok else 'FAIL'}")
                dense = kernels.dequantize(on_device, dtype)
                exact = (dense.float() - on_device.dequantize(torch.float32).to(dtype).float()).abs().max().item()
                ok = exact <= 1e-6 if dtype == torch.float32 else exact <= 2e-2 * dense.float().abs().max().item()
                failures += not ok
                print(f"bits={bits} {rows}x{columns} dequantize {dtype} max diff {exact:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    device, seed = device_and_seed()
    dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    sys.exit(main(device, dtypes, seed))
