"""How fast one expert runs on this machine's CPU through common/cpu_executor.py, against the
floor that memory bandwidth sets (bytes the call reads / the CPU's read GB/s, measured now).

Random HQQ codes of a real model's expert shape (timing does not depend on the values); batch 1
(one decode token) and a few tokens; torch's own threads (set OMP_NUM_THREADS to change them).
Each kernel of common/cpu_kernels side by side: the native one (reads 2-bit codes at 2 bits;
built on first use, seconds) and torch's int4pack (reads every code at 4 bits). Prints a table,
then the same as one JSON line. Needs only torch and numpy besides this checkout.

    python -m scripts.cpu_expert_bench [--shape mixtral-8x7b|qwen3-30b-a3b] [--bits 2,4] [--tokens 1,8]
        [--kernels native,int4pack] [--repeats 20] [--threads N] [--takes 0,4] [--busy-cores N]

--takes: the native kernel's tiles a thread takes at a time (0: one fixed share per thread).
--busy-cores: that many processes spin while it times, as a GPU loop's syncs or a server's
threads keep cores busy beside the experts."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time

import torch

from common.cpu_executor import TILES_PER_TAKE, CpuExpert
from common.quantization import QuantizedMatrix, QuantSpec, quantized_shapes
from common.store.blob_layout import ExpertWeights

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


def random_quantized(out_features: int, in_features: int, spec: QuantSpec, generator: torch.Generator) -> QuantizedMatrix:
    """Random codes, scales and zeros (imports only torch, so the script runs where only torch is)."""
    shapes = quantized_shapes(out_features, in_features, spec)
    planes = tuple(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
                   for name, (_, shape) in shapes.items() if name.startswith("codes"))
    groups = shapes["scale"][1]
    scale = (1e-3 * (1 + torch.rand(groups, generator=generator))).half()
    zero = ((2**spec.bits - 1) / 2 + torch.randn(groups, generator=generator) * 0.1).half()
    return QuantizedMatrix(planes, scale, zero, spec.bits, spec.group_size)


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_cores(count: int):
    """`count` spinning processes while the block runs, killed after it."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.join(timeout=10)


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
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--kernels", default="native,int4pack")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="the native kernel's threads (default torch's)")
    parser.add_argument("--takes", default=str(TILES_PER_TAKE), help="native: tiles a thread takes at a time, "
                        "comma-separated (0: one fixed share per thread)")
    parser.add_argument("--busy-cores", type=int, default=0, help="processes that spin while it times")
    args = parser.parse_args()
    hidden, width = SHAPES[args.shape]
    generator = torch.Generator().manual_seed(0)
    memory = read_gbps()
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = QuantSpec(bits, 64)
        weights = ExpertWeights(w13=random_quantized(2 * width, hidden, spec, generator),
                                w2=random_quantized(hidden, width, spec, generator))
        for kernel in args.kernels.split(","):
            for take in ([int(t) for t in args.takes.split(",")] if kernel == "native" else [TILES_PER_TAKE]):
                expert = CpuExpert(weights, dtype=torch.bfloat16, kernel=kernel, threads=args.threads, tiles_per_take=take)
                used = type(expert.w13).__name__
                for tokens in (int(t) for t in args.tokens.split(",")):
                    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
                    with busy_cores(args.busy_cores):
                        seconds = timed(lambda: expert(x), args.repeats)
                    floor = expert.nbytes / (memory * 1e9)
                    rows.append(dict(shape=args.shape, bits=bits, kernel=kernel, take=take if kernel == "native" else None,
                                     matrix=used, tokens=tokens, ms=seconds * 1e3, floor_ms=floor * 1e3,
                                     read_mb=expert.nbytes / 1e6, of_memory_bandwidth=floor / seconds))
                del expert
    threads = args.threads or torch.get_num_threads()
    print(f"CPU read bandwidth, measured now: {memory:.1f} GB/s; {threads} threads, {args.busy_cores} cores kept busy")
    print(f"{'shape':14s} {'bits':>4s} {'kernel':>9s} {'take':>4s} {'tokens':>6s} {'ms':>8s} {'floor ms':>9s} "
          f"{'MB read':>8s} {'of bw':>6s}")
    for r in rows:
        take = "-" if r["take"] is None else str(r["take"])
        print(f"{r['shape']:14s} {r['bits']:4d} {r['kernel']:>9s} {take:>4s} {r['tokens']:6d} {r['ms']:8.2f} "
              f"{r['floor_ms']:9.2f} {r['read_mb']:8.1f} {r['of_memory_bandwidth']:6.0%}")
    print(json.dumps({"read_gbps": memory, "threads": threads, "busy_cores": args.busy_cores, "results": rows}))


if __name__ == "__main__":
    main()
