"""Checks the MXFP4 kernels (coordinator/runtime/kernels/mxfp4_linear.py) against
Mxfp4Matrix.dequantize + matmul on random codes and scales; run by tests/test_kernels.py, on the
GPU or (TRITON_INTERPRET=1) on the CPU. Prints the seed first (rerun a failure with
`python -m tests.mxfp4_kernel_check DEVICE SEED`, with TRITON_INTERPRET=1 for the CPU), then one
line per case, and exits non-zero on a miss. Not collected by pytest (no test_ prefix).

What it asks:
  the GEMV (T = 1, 3) and the dequantize kernel + matmul (T = 17) give x @ W.T within BOUND
      (relative L2 error against float64);
  the dequantize kernel writes exactly Mxfp4Matrix.dequantize's weights, in every dtype;
  a GPT-OSS expert read from a blob (biases, clamped SwiGLU) gives the same output through the
      kernels as through the plain path."""

import sys

import torch

from common.expert_ffn import dequantize_linear, expert_forward
from common.model_config import ModelConfig
from common.mxfp4 import BLOCK, Mxfp4Matrix
from common.quantization import QuantSpec
from common.store.blob_layout import BlobLayout
from coordinator.runtime.kernels import mxfp4_linear as kernels
from tests.check_seed import device_and_seed, seeded

# Relative L2 error against float64: float32 accumulates in float32 (1e-7 seen); 16-bit types
# round x's product once, at the output (2^-9 for bfloat16).
BOUND = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
EXPERT_BOUND = {torch.float32: 1e-5, torch.float16: 3e-2, torch.bfloat16: 3e-2}  # rounded between the two matrices too
# (rows, columns). The interpreter runs every program in Python, so the CPU's shapes are small:
# rows not a multiple of the row block (8), one row of 3 blocks (a masked step), and 40 blocks
# a row (3 steps of 64 words, the last half masked). The GPU's add GPT-OSS's two expert shapes.
SHAPES = {"cuda": [(44, 96), (520, 1280), (2880, 2880), (5760, 2880)], "cpu": [(44, 96), (44, 1280)]}
TOKENS = (1, 3, 17)  # one and a few tokens take the fused GEMV, 17 the dequantize kernel + matmul
EXPERT = {"cuda": (2880, 2880), "cpu": (64, 96)}  # (hidden, ffn) of the expert read from a blob


def random_scales(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """e8m0 bytes about weights of std 0.02 (2^-8 .. 2^-4 times a code), with some extremes: 0
    (2^-127, a subnormal scale) and 132 (weights up to 6 * 2^5, still far from float16's limit)."""
    scales = torch.randint(119, 124, shape, dtype=torch.uint8, generator=generator)
    flat = scales.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=generator)] = 0
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=generator)] = 132
    return scales


def random_matrix(rows: int, columns: int, generator: torch.Generator) -> Mxfp4Matrix:
    codes = torch.randint(0, 256, (rows, columns // 2), dtype=torch.uint8, generator=generator)
    return Mxfp4Matrix(codes, random_scales((rows, columns // BLOCK), generator))


def gpt_oss_layout(hidden: int, ffn: int) -> BlobLayout:
    config = ModelConfig(vocab_size=16, hidden_size=hidden, intermediate_size=ffn, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=hidden, num_experts=2, top_k=1, rms_norm_eps=1e-5,
                         rope_theta=1e4, max_position_embeddings=8, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, family="gpt_oss",
                         expert_bias=True, expert_activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0)
    return BlobLayout.for_expert(config, QuantSpec.mxfp4(), torch.bfloat16)


def random_blob(layout: BlobLayout, generator: torch.Generator) -> torch.Tensor:
    tensors = {}
    for slot in layout.slots:
        if slot.name.endswith(".codes"):
            tensors[slot.name] = torch.randint(0, 256, slot.shape, dtype=torch.uint8, generator=generator)
        elif slot.name.endswith(".scales"):
            tensors[slot.name] = torch.randint(119, 124, slot.shape, dtype=torch.uint8, generator=generator)
        else:  # a bias
            tensors[slot.name] = (torch.randn(slot.shape, generator=generator) * 0.1).bfloat16()
    return layout.pack(tensors)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference.double()).norm() / reference.double().norm()).item()


def check_matrices(device: str, dtypes: list[torch.dtype], generator: torch.Generator) -> int:
    failures = 0
    for rows, columns in SHAPES[device]:
        whole = random_matrix(rows + 4, columns, generator)
        whole = Mxfp4Matrix(whole.codes.to(device), whole.scales.to(device))
        matrix = whole.rows(slice(4, None))  # views at an offset, as a slot's are
        assert kernels.supports(matrix)
        reference_weight = matrix.dequantize(torch.float32).double()
        for dtype in dtypes:
            for tokens in TOKENS:
                x = torch.randn(tokens, columns, generator=generator).to(device=device, dtype=dtype)
                reference = x.double() @ reference_weight.T
                out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=device)
                out.copy_(kernels.mxfp4_linear(x, matrix))
                error = relative_error(out, reference)
                ok = error < BOUND[dtype] and not torch.isnan(out).any()
                failures += not ok
                print(f"mxfp4 {rows}x{columns} {str(dtype):>14} T={tokens:<3} rel err {error:.2e} {'ok' if ok else 'FAIL'}")
            dense = kernels.dequantize(matrix, dtype)
            exact = torch.equal(dense, matrix.dequantize(dtype))
            failures += not exact
            print(f"mxfp4 {rows}x{columns} dequantize {dtype} {'exact ok' if exact else 'FAIL (not exact)'}")
    return failures


def check_expert(device: str, dtypes: list[torch.dtype], generator: torch.Generator) -> int:
    failures = 0
    hidden, ffn = EXPERT[device]
    layout = gpt_oss_layout(hidden, ffn)
    weights = layout.views(random_blob(layout, generator).to(device))
    for dtype in dtypes:
        for tokens in (1, 17):
            x = torch.randn(tokens, hidden, generator=generator).to(device=device, dtype=dtype)
            reference = expert_forward(x.double(), weights, dequantize_linear)
            out = expert_forward(x, weights, kernels.mxfp4_linear)
            error = relative_error(out, reference)
            ok = error < EXPERT_BOUND[dtype] and not torch.isnan(out).any()
            failures += not ok
            print(f"gpt_oss expert H={hidden} F={ffn} {str(dtype):>14} T={tokens:<3} rel err {error:.2e} {'ok' if ok else 'FAIL'}")
    return failures


def main(device: str, dtypes: list[torch.dtype], seed: int) -> int:
    generator = seeded("tests.mxfp4_kernel_check", device, seed)
    failures = check_matrices(device, dtypes, generator) + check_expert(device, dtypes, generator)
    return 1 if failures else 0


if __name__ == "__main__":
    device, seed = device_and_seed()
    # No bfloat16 in the interpreter: it drops float32 subnormals on the way there (scale byte 0).
    dtypes = [torch.float32, torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    sys.exit(main(device, dtypes, seed))
