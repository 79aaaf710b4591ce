"""Times the MXFP4 kernels (coordinator/runtime/kernels/mxfp4_linear.py) on GPT-OSS's expert
shapes (w13 [5760, 2880], w2 [2880, 2880]: the same in 20b and 120b), bf16, against what ran
before them: Mxfp4Matrix.dequantize + matmul. Every call is captured in a CUDA graph over enough
matrices to spill L2 (no launch cost, no L2 reuse: a cache slot's expert is cold), so a CUDA graph
capturing the kernels is itself checked. Prints us, GB/s of the bytes each must read (codes +
scales) and the share of the device copy rate; then sweeps the GEMV's tile (rows a program, words
a step, warps) at T = 1 and prints the best, to set mxfp4_linear's defaults from. Also checks each
result against float32 dequantize + matmul.
    python scripts/mxfp4_bench.py [--json OUT.json]      (on a CUDA machine; never run yet)"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from common.mxfp4 import BLOCK, Mxfp4Matrix
from coordinator.runtime.kernels import mxfp4_linear as kernels
from coordinator.tools.synthetic_shapes import GPT_OSS_20B
from scripts.kernel_bench import device_copy_gbps
from scripts.slot_expert_bench import graph_us

L2_BYTES = 50 << 20  # H200; the rotation covers twice this
TOKENS = (1, 2, 4, 17)  # the GEMV up to mxfp4_linear.DECODE_MAX_TOKENS, then the dequantize kernel + matmul


def shapes() -> dict[str, tuple[int, int]]:
    hidden, ffn = GPT_OSS_20B["hidden_size"], GPT_OSS_20B["intermediate_size"]
    return {"w13": (2 * ffn, hidden), "w2": (hidden, ffn)}


def random_matrices(rows: int, columns: int, device: torch.device) -> list[Mxfp4Matrix]:
    nbytes = rows * columns // 2 + rows * columns // BLOCK
    count = max(4, -(-2 * L2_BYTES // nbytes))
    return [Mxfp4Matrix(torch.randint(0, 256, (rows, columns // 2), dtype=torch.uint8, device=device),
                        torch.randint(118, 124, (rows, columns // BLOCK), dtype=torch.uint8, device=device))
            for _ in range(count)]


def relative_error(out: torch.Tensor, x: torch.Tensor, matrix: Mxfp4Matrix) -> float:
    reference = x.float() @ matrix.dequantize(torch.float32).T
    return ((out.float() - reference).norm() / reference.norm()).item()


def row(results: list, peak: float, **fields) -> None:
    fields["gbps"] = fields["nbytes"] / fields["us"] / 1e3
    fields["of_copy"] = fields["gbps"] / peak
    results.append(fields)
    tile = f" BO={fields['block_o']} BW={fields['block_w']} warps={fields['warps']}" if "block_o" in fields else ""
    print(f"{fields['matrix']:<4} {fields['shape']:<10} T={fields['tokens']:<3} {fields['path']:<24}{tile:<26} "
          f"{fields['us']:7.1f} us {fields['gbps']:6.0f} GB/s ({fields['of_copy']:4.0%} of copy) err {fields['error']:.1e}")


def main(json_path: str | None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    peak = device_copy_gbps(device)
    results: list[dict] = []
    for name, (rows, columns) in shapes().items():
        matrices = random_matrices(rows, columns, device)
        nbytes = matrices[0].codes.numel() + matrices[0].scales.numel()
        common = dict(matrix=name, shape=f"{rows}x{columns}", nbytes=nbytes)
        for tokens in TOKENS:
            x = torch.randn(tokens, columns, device=device, dtype=torch.bfloat16)
            paths = {
                "mxfp4_linear": lambda m: kernels.mxfp4_linear(x, m),
                "dequantize kernel+matmul": lambda m: F.linear(x, kernels.dequantize(m, x.dtype)),
                "dequantize+matmul (was)": lambda m: F.linear(x, m.dequantize(x.dtype)),
            }
            for path, work in paths.items():
                us = graph_us(lambda i: work(matrices[i]), len(matrices))
                row(results, peak, **common, tokens=tokens, path=path, us=us, error=relative_error(work(matrices[0]), x, matrices[0]))
        x = torch.randn(1, columns, device=device, dtype=torch.bfloat16)
        best = None
        for block_o, block_w, warps in itertools.product((4, 8, 16, 32, 64), (32, 64, 128, 256), (1, 2, 4, 8)):
            def work(m, block_o=block_o, block_w=block_w, warps=warps):
                return kernels.gemv(x, m, block_o=block_o, block_w=block_w, num_warps=warps)
            try:
                us = graph_us(lambda i: work(matrices[i]), len(matrices))
            except Exception as error:  # a tile that does not compile or fit
                print(f"{name} BO={block_o} BW={block_w} warps={warps}: {type(error).__name__}")
                continue
            row(results, peak, **common, tokens=1, path="gemv sweep", block_o=block_o, block_w=block_w, warps=warps,
                us=us, error=relative_error(work(matrices[0]), x, matrices[0]))
            if best is None or us < best["us"]:
                best = results[-1]
        print(f"best GEMV tile for {name}: BO={best['block_o']} BW={best['block_w']} warps={best['warps']}, "
              f"{best['us']:.1f} us, {best['gbps']:.0f} GB/s ({best['of_copy']:.0%} of copy)")
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": peak, "results": results}, out, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every row here too")
    main(parser.parse_args().json)
