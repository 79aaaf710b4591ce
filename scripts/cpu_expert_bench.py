"""How fast one expert runs on this machine's CPU through common/cpu_executor.py, against the
floor that memory bandwidth sets (bytes the call reads / the CPU's read GB/s, measured now).

Random HQQ codes of a real model's expert shape (timing does not depend on the values); batch 1
(one decode token) and a few tokens; torch's own threads (set OMP_NUM_THREADS to change them).
Each kernel of common/cpu_kernels side by side: the native one (reads 2-bit codes at 2 bits;
built on first use, seconds) and torch's int4pack (reads every code at 4 bits). Prints a table,
then the same as one JSON line. Needs only torch and numpy besides this checkout.

    python -m scripts.cpu_expert_bench [--shape mixtral-8x7b|qwen3-30b-a3b] [--bits 2,4] [--tokens 1,8]
        [--kernels native,int4pack] [--repeats 20] [--threads 1,16] [--takes 0,4] [--x-digits 0,1,2]
        [--busy-cores N] [--cold 48] [--dma] [--gap-ms 3 [--gap-spin]] [--without avx512bf16]

--threads: the native kernel's threads, comma-separated (default torch's; the floor's read
bandwidth is measured at each count). --takes: the native kernel's tiles a thread takes at a time
(0: one fixed share per thread). --x-digits: x as given (0) or as 1 or 2 int8 digits
(MOE_EDGE_CPU_X_DIGITS; AVX512-VNNI only). --without: the native kernel built without those
instruction sets, to time here what a CPU without them would run.
--busy-cores: that many processes spin while it times, as a GPU loop's syncs or a server's
threads keep cores busy beside the experts. --cold N: each call runs the next of N copies of the
expert, so that its bytes come from memory rather than the CPU's last-level cache, as in a decode
(which never runs one expert twice in a row); one copy (the default) can sit in a large cache and
read faster than memory. --dma: meanwhile the GPU copies pinned host memory in (CUDA), as placement
auto's copies do while the CPU runs: both read the same memory. --gap-ms G: the caller waits G ms
before each call (sleeping, or spinning with --gap-spin), as the decode's runs come a few layers
apart: the kernel's threads and the caller's core may have gone idle by then (on this project's
noisy 2-core VM a 3 ms sleep added 0 to 0.6 ms to a 1.6-2.0 ms call from run to run: to be settled
on a quieter machine)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import statistics
import threading
import time

import torch

from common import cpu_kernels
from common.cpu_executor import TILES_PER_TAKE, CpuExpert, NativeMatrix
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


@contextlib.contextmanager
def threads_of_torch(count: int):
    """torch's intra-op threads set to `count` while the block runs (the int4pack matmul and the
    read-bandwidth sum use them; the native kernel is told its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def device_copies(on: bool, nbytes: int = 256 << 20):
    """While the block runs, a thread keeps the GPU copying `nbytes` of pinned host memory in,
    one copy after another (what the decode's copy stream does while the CPU runs experts);
    yields the GB/s those copies moved."""
    if not on:
        yield {}
        return
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stop, moved = threading.Event(), {}

    def copy_in() -> None:
        stream, count, started = torch.cuda.Stream(), 0, time.perf_counter()
        with torch.cuda.stream(stream):
            while not stop.is_set():
                device.copy_(host, non_blocking=True)
                stream.synchronize()
                count += 1
        moved["gbps"] = count * nbytes / (time.perf_counter() - started) / 1e9

    worker = threading.Thread(target=copy_in, daemon=True)
    worker.start()
    try:
        yield moved
    finally:
        stop.set()
        worker.join(timeout=30)


def copies_of(expert: CpuExpert, count: int) -> list[CpuExpert]:
    """`expert` and count - 1 copies of it with tensors of their own (cloned, not repacked again)."""
    twins = [expert]
    for _ in range(count - 1):
        twin = copy.copy(expert)
        for name in ("w13", "w2"):
            matrix = copy.copy(getattr(expert, name))
            for attribute, value in vars(matrix).items():
                if isinstance(value, torch.Tensor):
                    setattr(matrix, attribute, value.clone())
            setattr(twin, name, matrix)
        twins.append(twin)
    return twins


def wait(seconds: float, spin: bool) -> None:
    if not spin:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timed(function, repeats: int, gap: float = 0.0, spin: bool = False) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if gap:
            wait(gap, spin)
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def precision(bits: int, digits: list[int], generator: torch.Generator) -> dict[str, float]:
    """The largest error over the largest output of a [256, 4096] matrix times 8 tokens of x, against
    float64 products of its dequantized weight and x in fp32: for x in bf16 as given, and as each
    count of int8 digits (0: bf16 x's own rounding)."""
    matrix = random_quantized(256, 4096, QuantSpec(bits, 64), generator)
    weight = matrix.dequantize(torch.float64)
    x = torch.randn(8, 4096, generator=generator)
    reference = x.double() @ weight.T
    errors = {}
    for count in digits:
        native = NativeMatrix(matrix, torch.float32, cpu_kernels.native_library("native"), x_digits=count)
        errors[f"x digits {count}" if count else "x as given"] = native(x).double()
    errors["bf16 x"] = x.bfloat16().double() @ weight.T
    return {name: ((y - reference).abs().max() / reference.abs().max()).item() for name, y in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    parser.add_argument("--bits", default="2,4")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--kernels", default="native,int4pack")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", default=None, help="the native kernel's threads, comma-separated (default torch's)")
    parser.add_argument("--takes", default=str(TILES_PER_TAKE), help="native: tiles a thread takes at a time, "
                        "comma-separated (0: one fixed share per thread)")
    parser.add_argument("--x-digits", default="0", help="native: x as given (0) or as 1 or 2 int8 digits, "
                        "comma-separated")
    parser.add_argument("--busy-cores", type=int, default=0, help="processes that spin while it times")
    parser.add_argument("--cold", type=int, default=1, help="run the next of this many copies of the expert at "
                        "each call (its bytes then come from memory, not the last-level cache)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="wait this long before each call")
    parser.add_argument("--gap-spin", action="store_true", help="spin through the gap rather than sleep")
    parser.add_argument("--dma", action="store_true", help="meanwhile copy pinned host memory into the GPU (CUDA)")
    parser.add_argument("--without", default="", help="native: build it without these instruction sets, "
                        "comma-separated gcc names (avx512bf16: as on a CPU without AVX512-BF16)")
    args = parser.parse_args()
    if args.without:
        cpu_kernels.load_built_with(tuple(f"-mno-{name}" for name in args.without.split(",")))
    hidden, width = SHAPES[args.shape]
    generator = torch.Generator().manual_seed(0)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    memory = {}
    for threads in thread_counts:
        with threads_of_torch(threads):
            memory[threads] = read_gbps()
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = QuantSpec(bits, 64)
        weights = ExpertWeights(w13=random_quantized(2 * width, hidden, spec, generator),
                                w2=random_quantized(hidden, width, spec, generator))
        for kernel in args.kernels.split(","):
            native = kernel == "native"
            for take in ([int(t) for t in args.takes.split(",")] if native else [TILES_PER_TAKE]):
                for digits in ([int(d) for d in args.x_digits.split(",")] if native else [0]):
                    expert = CpuExpert(weights, dtype=torch.bfloat16, kernel=kernel, tiles_per_take=take,
                                       x_digits=digits if native else None)
                    used = type(expert.w13).__name__
                    experts = copies_of(expert, args.cold)
                    for threads in thread_counts:
                        for twin in experts:
                            for matrix in (twin.w13, twin.w2):
                                matrix.threads = threads  # NativeMatrix's; torch's own matmuls ignore it
                        for tokens in (int(t) for t in args.tokens.split(",")):
                            x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
                            turn = iter(range(1 << 62))
                            with busy_cores(args.busy_cores), threads_of_torch(threads), device_copies(args.dma) as dma:
                                seconds = timed(lambda: experts[next(turn) % len(experts)](x), args.repeats,
                                                args.gap_ms / 1e3, args.gap_spin)
                            floor = expert.nbytes / (memory[threads] * 1e9)
                            rows.append(dict(shape=args.shape, bits=bits, kernel=kernel, take=take if native else None,
                                             x_digits=digits if native else None, threads=threads, matrix=used,
                                             tokens=tokens, ms=seconds * 1e3, floor_ms=floor * 1e3,
                                             read_mb=expert.nbytes / 1e6, of_memory_bandwidth=floor / seconds,
                                             dma_gbps=dma.get("gbps")))
                    expert = experts = None  # this variant's copies freed before the next is built
    library = cpu_kernels.native_library("auto")
    print("native kernel: " + (cpu_kernels.describe(library) if library is not None else "unavailable"))
    print("CPU read bandwidth, measured now: " + ", ".join(f"{memory[t]:.1f} GB/s on {t} threads" for t in thread_counts)
          + f"; {args.busy_cores} cores kept busy; {args.cold} copies of each expert in turn"
          + (f"; {args.gap_ms} ms {'spun' if args.gap_spin else 'slept'} before each call" if args.gap_ms else "")
          + (", the GPU copying pinned memory in meanwhile" if args.dma else ""))
    print(f"{'shape':14s} {'bits':>4s} {'kernel':>9s} {'take':>4s} {'digits':>6s} {'threads':>7s} {'tokens':>6s} "
          f"{'ms':>8s} {'floor ms':>9s} {'MB read':>8s} {'of bw':>6s}" + (f" {'dma GB/s':>8s}" if args.dma else ""))
    for r in rows:
        take = "-" if r["take"] is None else str(r["take"])
        digits = "-" if r["x_digits"] is None else str(r["x_digits"])
        print(f"{r['shape']:14s} {r['bits']:4d} {r['kernel']:>9s} {take:>4s} {digits:>6s} {r['threads']:7d} "
              f"{r['tokens']:6d} {r['ms']:8.2f} {r['floor_ms']:9.2f} {r['read_mb']:8.1f} {r['of_memory_bandwidth']:6.0%}"
              + (f" {r['dma_gbps']:8.1f}" if args.dma else ""))
    errors = {}
    if "native" in args.kernels.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            errors[bits] = precision(bits, [int(d) for d in args.x_digits.split(",")], generator)
            print(f"{bits}-bit precision (largest error / largest output, fp32 x as the reference): "
                  + ", ".join(f"{name} {error:.1e}" for name, error in errors[bits].items()))
    print(json.dumps({"read_gbps": memory, "busy_cores": args.busy_cores, "cold": args.cold, "dma": args.dma,
                      "gap_ms": args.gap_ms, "gap_spin": args.gap_spin,
                      "results": rows, "precision": errors}))

if __name__ == "__main__":
    main()
