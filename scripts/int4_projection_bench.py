"""Would the decode step's attention projections read faster as 4-bit codes than as the bf16
weights the engine dequantizes them into at load? Times, for one token x [1, I] on a GPU and the
shapes of Mixtral-8x7B's fused qkv [6144, 4096] and o [4096, 4096] (and a w13-sized matrix for
scale), F.linear on bf16 against torch's tinygemm (`torch._weight_int4pack_mm`, int4 codes with a
bf16 scale and zero per group of 64: w = (q - 8) * scale + zero, which an HQQ 4-bit matrix maps onto
exactly but for the bf16 rounding of its fp16 scale and of zero * scale). Checks the packing
against the dequantized weight first (both nibble orders; the one that matches is used) and prints
GB/s of the bytes each reads. CUDA graphs of 50 calls each, median of 5.
    PYTHONPATH=. python3 scripts/int4_projection_bench.py          (on a CUDA machine)"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("w13-sized", 28672, 4096))
GROUP = 64
CALLS = 50


def graph_us(fn) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda")
    print(f"{'matrix':10} {'path':22} {'us':>8} {'GB/s':>7} {'rel err':>8}")
    for name, rows, cols in SHAPES:
        codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32, device=device)
        scale = (torch.rand(rows, cols // GROUP, device=device) * 0.01).half()
        zero = (torch.rand(rows, cols // GROUP, device=device) * 15).half()
        weight = ((codes.float() - zero.float().repeat_interleave(GROUP, 1)) * scale.float().repeat_interleave(GROUP, 1))
        x = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
        exact = x.float() @ weight.T
        dense = weight.to(torch.bfloat16)
        out = torch.empty(1, rows, device=device, dtype=torch.bfloat16)
        us = graph_us(lambda: torch.matmul(x, dense.T, out=out))
        error = ((F.linear(x, dense).float() - exact).norm() / exact.norm()).item()
        print(f"{name:10} {'bf16 F.linear':22} {us:8.1f} {dense.numel() * 2 / us / 1e3:7.0f} {error:8.1e}")
        scales_and_zeros = torch.stack([scale.float().T, ((8 - zero.float()) * scale.float()).T], dim=2)
        scales_and_zeros = scales_and_zeros.to(torch.bfloat16).contiguous()  # [I / G, O, 2]
        nbytes = rows * cols // 2 + scales_and_zeros.numel() * 2
        for order, packed_bytes in (("high first", (codes[:, ::2] << 4) | codes[:, 1::2]),
                                    ("low first", (codes[:, 1::2] << 4) | codes[:, ::2])):
            for inner in (8, 4, 2):
                label = f"tinygemm {order} k{inner}"
                try:
                    packed = torch._convert_weight_to_int4pack(packed_bytes.to(torch.uint8).contiguous(), inner)
                    y = torch._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)
                    error = ((y.float() - exact).norm() / exact.norm()).item()
                    us = graph_us(lambda: torch._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros))
                except Exception as exc:
                    print(f"{name:10} {label:22} failed: {type(exc).__name__}: {str(exc)[:90]}")
                    continue
                print(f"{name:10} {label:22} {us:8.1f} {nbytes / us / 1e3:7.0f} {error:8.1e}")


if __name__ == "__main__":
    main()
