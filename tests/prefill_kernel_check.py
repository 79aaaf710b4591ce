"""Checks the fused prefill kernel (coordinator/runtime/kernels/prefill_matmul.py) on random HQQ
matrices; run by tests/test_prefill_kernel.py, on the GPU or (TRITON_INTERPRET=1) on the CPU.
Prints the seed first (rerun a failure with `python -m tests.prefill_kernel_check DEVICE SEED`,
with TRITON_INTERPRET=1 for the CPU), then one line per case, and exits non-zero on a miss. Not
collected by pytest (no test_ prefix).

What it asks, for 2 and 4 bits, fp16 and bf16 x, every T (masking: T not a multiple of BM, O not
of BN), the table's config and the same tile without (or with) swap_ab:

  exact weights: with x = the identity (T = I), out = W.T exactly: each output is one product
      1 * w, so any difference is a weight rounded otherwise than the dequantize kernel's;
  the bound against float64: W_d = the dequantize kernel's weights in x's dtype (what
      dequantize + F.linear multiplies), ref = float64 x @ W_d.T. A product of two 16-bit floats
      is exact in float32 (8 + 8 or 11 + 11 significant bits, of 24), so the kernel's only errors
      are the float32 sum and the final rounding:
          |out - ref| <= u * |ref| + (1 + u) * E + tiny,   E = 2 * I * 2^-24 * (|x| @ |W_d|.T)
      u = unit roundoff of x's dtype (2^-8 bf16, 2^-11 fp16), tiny = half the dtype's smallest
      subnormal step (fp16's underflow); E is the worst case of a recursive float32 sum of I
      terms, doubled for tensor cores that may truncate rather than round as they add;
  against dequantize + F.linear: F.linear sums in float32 too (with cuBLAS's reduced-precision
      reductions switched off here: torch allows them for 16-bit types by default, split-K
      partial sums rounded to bf16/fp16, which no float32 bound covers), so both lie within the
      bound of ref and |out - linear| <= twice the bound (the two can differ by an output
      rounding step where their float32 sums straddle it; they are not bitwise equal).

Under the interpreter two things differ from the GPU, on purpose or not: tl.dot on bfloat16
multiplies their raw bits as integers there (Triton 3.9), so the kernel gives the interpreter
float32 copies of the same bf16 tiles (DOT_IN_FP32; same products); and a float32 -> bf16
conversion truncates there instead of rounding to nearest even, in the dequantize kernel as
in this one, weights and outputs alike. So on the CPU the bf16 weights are checked against the
dequantize kernel's (truncated alike), rounding to nearest even only in fp16, and bf16's bound
takes a whole output step for u (2^-7); on the GPU both dtypes are also checked against
QuantizedMatrix.dequantize exactly, with u as above."""

import dataclasses
import sys

import torch

from common.quantization import QuantizedMatrix, QuantSpec, quantize_matrix
from coordinator.runtime.kernels import prefill_matmul
from coordinator.runtime.kernels import quantized_linear as kernels
from tests.check_seed import device_and_seed, seeded

# (rows, columns, group). The CPU's are small (the interpreter runs every program in Python):
# rows not a multiple of the output block, two K steps a plane, and a group of 32 (BK fitted
# down to it). The GPU's add Qwen3-30B-A3B's two expert matrices and a Mixtral-like w2 slice.
SHAPES = {"cpu": [(72, 256, 64), (40, 384, 32)],
          "cuda": [(72, 256, 64), (40, 384, 32), (1536, 2048, 64), (2048, 768, 64), (520, 4096, 64)]}
TOKENS = {"cpu": (1, 5, 17, 64), "cuda": (1, 5, 17, 64, 128, 300, 512)}


def error_bound(x: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor, truncating: bool) -> torch.Tensor:
    """The per-element bound above, [T, O] float64, for x [T, I] and weights [O, I] in x's dtype;
    `truncating`: the output rounds toward zero (bf16 under the interpreter), a whole step."""
    info = torch.finfo(x.dtype)
    unit = info.eps if truncating else info.eps / 2
    tiny = info.tiny * info.eps / 2
    magnitude = x.double().abs() @ weights.double().abs().T  # [T, O]
    summation = 2 * x.shape[1] * 2.0**-24 * magnitude
    return unit * reference.abs() + (1 + unit) * summation + tiny


def on(matrix: QuantizedMatrix, device: str) -> QuantizedMatrix:
    return QuantizedMatrix(tuple(p.to(device) for p in matrix.planes), matrix.scale.to(device),
                           matrix.zero.to(device), matrix.bits, matrix.group_size)


def configs(tokens: int, matrix: QuantizedMatrix) -> list[prefill_matmul.PrefillConfig]:
    """The table's config and its twin with swap_ab flipped."""
    table = prefill_matmul.prefill_config(tokens, matrix.shape[0], matrix.bits, matrix.group_size)
    return [table, dataclasses.replace(table, swap_ab=not table.swap_ab)]


def check_exact_weights(matrix: QuantizedMatrix, dtype: torch.dtype, weights: torch.Tensor, device: str) -> int:
    """The identity case: out must be W_d.T bit for bit; on the GPU W_d must also be
    QuantizedMatrix.dequantize's (the interpreter truncates bf16, see the docstring)."""
    failures = 0
    eye = torch.eye(matrix.shape[1], dtype=dtype, device=device)
    for config in configs(matrix.shape[1], matrix):
        out = prefill_matmul.prefill_linear(eye, matrix, config)
        ok = torch.equal(out, weights.T)
        failures += not ok
        print(f"  identity {config.label():>18}: out == W.T exactly {'ok' if ok else 'FAIL'}")
    if device == "cuda" or dtype == torch.float16:
        ok = torch.equal(weights, matrix.dequantize(dtype))
        failures += not ok
        print(f"  dequantize kernel == QuantizedMatrix.dequantize exactly {'ok' if ok else 'FAIL'}")
    return failures


def check_tokens(matrix: QuantizedMatrix, dtype: torch.dtype, weights: torch.Tensor, tokens: int,
                 generator: torch.Generator, device: str) -> int:
    """One T: every config within the bound of float64, and of dequantize + F.linear."""
    x = torch.randn(tokens, matrix.shape[1], generator=generator).to(device=device, dtype=dtype)
    reference = x.double() @ weights.double().T  # [T, O]
    bound = error_bound(x, weights, reference, truncating=device == "cpu" and dtype == torch.bfloat16)
    linear = torch.nn.functional.linear(x, weights)
    failures = 0
    for config in configs(tokens, matrix):
        out = torch.full((tokens, matrix.shape[0]), float("nan"), dtype=dtype, device=device)
        prefill_matmul.prefill_linear(x, matrix, config, out=out)
        error = (out.double() - reference).abs()
        worst = (error / bound).max().item()  # < 1 within the bound
        apart = ((out.double() - linear.double()).abs() / (2 * bound)).max().item()
        ok = worst < 1 and apart < 1 and not torch.isnan(out).any()
        failures += not ok
        print(f"  T={tokens:<4} {config.label():>18}: max |err|/bound {worst:.3f}, vs F.linear {apart:.3f}, "
              f"rel L2 {(error.norm() / reference.norm()).item():.1e} {'ok' if ok else 'FAIL'}")
    return failures


def main(device: str, seed: int) -> int:
    generator = seeded("tests.prefill_kernel_check", device, seed)
    if device == "cuda":  # F.linear's sums in float32 (see the docstring)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    failures = 0
    for bits in (2, 4):
        for rows, columns, group in SHAPES[device]:
            weight = torch.randn(rows, columns, generator=generator) * 0.02
            matrix = on(quantize_matrix(weight, QuantSpec(bits, group)), device)
            for dtype in (torch.float16, torch.bfloat16):
                assert prefill_matmul.supports(matrix, dtype), (bits, rows, columns, group)
                print(f"bits={bits} {rows}x{columns} g{group} {dtype}")
                weights = kernels.dequantize(matrix, dtype)  # [O, I]: what dequantize + F.linear multiplies
                failures += check_exact_weights(matrix, dtype, weights, device)
                for tokens in TOKENS[device]:
                    failures += check_tokens(matrix, dtype, weights, tokens, generator, device)
    print(f"{failures} FAILED" if failures else "all ok")
    return 1 if failures else 0


if __name__ == "__main__":
    device, seed = device_and_seed()
    sys.exit(main(device, seed))
