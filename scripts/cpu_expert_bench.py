"""How fast one expert runs on this machine's CPU through common/cpu_executor.py, against the
floor that memory bandwidth sets (bytes the call reads / the CPU's read GB/s, measured now).

Random HQQ codes of a real model's expert shape (timing does not depend on the values); batch 1
(one decode token) and a few tokens; torch's own threads (set OMP_NUM_THREADS to change them).
Prints a table, then the same as one JSON line.

    python scripts/cpu_expert_bench.py [--shape mixtral-8x7b|qwen3-30b-a3b] [--bits 2,4] [--repeats 20]"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from common.cpu_executor import CpuExpert
from common.quantization import QuantSpec
from common.store.blob_layout import ExpertWeights
from coordinator.tools.synthetic import random_quantized

SHAPES = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}  # hidden, expert FFN width


def read_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best GB/s of summing a large buffer with torch's threads: what the CPU can read."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        float(buffer.sum())
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    parser.add_argument("--bits", default="2,4")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    hidden, width = SHAPES[args.shape]
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    memory = read_gbps()
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = QuantSpec(bits, 64)
        weights = ExpertWeights(w13=random_quantized(2 * width, hidden, spec, 0.02, generator, rng),
                                w2=random_quantized(hidden, width, spec, 0.002, generator, rng))
        expert = CpuExpert(weights, dtype=torch.bfloat16)
        for tokens in (1, 8):
            x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
            seconds = timed(lambda: expert(x), args.repeats)
            floor = expert.nbytes / (memory * 1e9)
            rows.append(dict(shape=args.shape, bits=bits, tokens=tokens, ms=seconds * 1e3, floor_ms=floor * 1e3,
                             read_mb=expert.nbytes / 1e6, of_memory_bandwidth=floor / seconds))
    print(f"CPU read bandwidth, measured now: {memory:.1f} GB/s, {torch.get_num_threads()} threads")
    print(f"{'shape':14s} {'bits':>4s} {'tokens':>6s} {'ms':>8s} {'floor ms':>9s} {'MB read':>8s} {'of bw':>6s}")
    for r in rows:
        print(f"{r['shape']:14s} {r['bits']:4d} {r['tokens']:6d} {r['ms']:8.2f} {r['floor_ms']:9.2f} {r['read_mb']:8.1f} "
              f"{r['of_memory_bandwidth']:6.0%}")
    print(json.dumps({"read_gbps": memory, "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
