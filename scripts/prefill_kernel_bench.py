"""Times the prompt path's expert matmul on HQQ codes, x [T, I] @ W.T, three ways:
  (a) dequantize + linear: the dequantize kernel into a bf16 scratch weight, then F.linear (the
      path before the fused kernel, and MOE_EDGE_FUSED_PREFILL=0's);
  (b) fused: coordinator/runtime/kernels/prefill_matmul.py at the table's config ("table") and
      at each of a short list of others, to re-derive the table from;
  (c) linear only: F.linear on a weight dequantized beforehand, the cuBLAS floor that (a) adds
      its dequantize to.
Shapes: Mixtral-8x7B's w13 [28672, 4096] and w2 [4096, 14336] at 2 bits, Qwen3-30B-A3B's w13
[1536, 2048] and w2 [2048, 768] at 4 bits; group 64; T in 16, 64, 128, 256, 512 (a 512-token
Mixtral prompt gives each expert ~128). Prints us, TFLOP/s and the speedup over (a) per case, then
the best config per (shape, T). triton.testing.do_bench flushes L2 before every run, as a
prompt's next expert finds it. A config that fails to compile or run, or whose output strays from
(a)'s by more than MAX_REL_ERR, is printed and skipped.

First pass: (a), (c) and the table for every case, with the table's first call (its compile)
timed; second pass: the other configs. Both stop once BENCH_BUDGET_S (default 60) seconds have
gone, saying how many measurements were left out.
    python -m scripts.prefill_kernel_bench                  (on a CUDA machine)
    BENCH_BUDGET_S=300 BENCH_JSON=prefill.json python -m scripts.prefill_kernel_bench"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton

from coordinator.runtime.kernels import prefill_matmul as pm
from coordinator.runtime.kernels import quantized_linear as ql
from scripts.kernel_bench import random_matrix

SHAPES = (  # (name, O, I, bits)
    ("mixtral w13", 28672, 4096, 2),
    ("mixtral w2", 4096, 14336, 2),
    ("qwen3-30b-a3b w13", 1536, 2048, 4),
    ("qwen3-30b-a3b w2", 2048, 768, 4),
)
TOKENS = (16, 64, 128, 256, 512)
GROUP = 64
MAX_REL_ERR = 1e-2  # relative L2 against (a); the kernel's own bound is tests/prefill_kernel_check.py's
CANDIDATES = tuple(pm.PrefillConfig(*c) for c in (  # (BM, BN, BK, warps, stages, swap_ab)
    (16, 64, 64, 4, 4, True), (16, 128, 64, 4, 4, True), (16, 64, 64, 4, 4, False),
    (32, 128, 64, 4, 4, True), (32, 64, 64, 4, 4, False),
    (64, 128, 32, 4, 3, True), (64, 128, 64, 4, 3, True), (64, 128, 32, 4, 3, False), (64, 64, 64, 4, 4, True),
    (128, 128, 32, 8, 3, True), (128, 128, 64, 8, 3, True), (128, 128, 32, 8, 3, False),
    (128, 256, 32, 8, 3, True), (128, 64, 64, 4, 3, True),
))


class Budget:
    """Seconds left of BENCH_BUDGET_S, and how many measurements it left out."""

    def __init__(self, seconds: float):
        self.seconds, self.started, self.left_out = seconds, time.monotonic(), 0

    def spent(self) -> bool:
        return time.monotonic() - self.started > self.seconds

    def allows(self) -> bool:
        if self.spent():
            self.left_out += 1
            return False
        return True


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1000


def tflops(tokens: int, rows: int, columns: int, us: float) -> float:
    return 2 * tokens * rows * columns / us / 1e6


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def fits(config: pm.PrefillConfig, tokens: int) -> bool:
    """Configs worth timing at T: a token block no wider than T's power of two (a wider one
    only computes padding) and a K block that divides the group."""
    return config.block_m <= max(16, triton.next_power_of_2(tokens)) and GROUP % config.block_k == 0


class Case:
    """One (shape, T): its weight, x, the reference output of (a), and the rows it printed."""

    def __init__(self, name: str, rows: int, columns: int, bits: int, tokens: int, device: torch.device):
        self.name, self.rows, self.columns, self.bits, self.tokens = name, rows, columns, bits, tokens
        self.weight = random_matrix(rows, columns, bits, GROUP, device)
        self.x = torch.randn(tokens, columns, device=device, dtype=torch.bfloat16)
        self.scratch = torch.empty(rows, columns, device=device, dtype=torch.bfloat16)
        self.reference = F.linear(self.x, ql.dequantize(self.weight, torch.bfloat16, self.scratch))
        self.baseline_us: float | None = None

    def record(self, results: list, method: str, us: float, note: str = "", **extra) -> None:
        speedup = self.baseline_us / us if self.baseline_us else None
        row = dict(shape=self.name, O=self.rows, I=self.columns, bits=self.bits, T=self.tokens, method=method,
                   us=round(us, 2), tflops=round(tflops(self.tokens, self.rows, self.columns, us), 1),
                   speedup_vs_dequantize=round(speedup, 3) if speedup else None, **extra)
        results.append(row)
        label = extra.get("config", "")
        gain = f" {speedup:5.2f}x" if speedup else ""
        print(f"{self.name:>18} T={self.tokens:<4} {method:>18} {label:>20} {us:9.1f} us "
              f"{row['tflops']:7.1f} TFLOP/s{gain}{note}", flush=True)

    def time_unfused(self, results: list) -> None:
        def dequantize_and_linear():
            return F.linear(self.x, ql.dequantize(self.weight, torch.bfloat16, self.scratch))

        self.baseline_us = median_us(dequantize_and_linear)
        self.record(results, "dequantize+linear", self.baseline_us)
        self.record(results, "linear only", median_us(lambda: F.linear(self.x, self.scratch)))

    def time_fused(self, results: list, config: pm.PrefillConfig, table: bool) -> None:
        """Check the config's output against (a), then time it; a failure is printed, not raised."""
        out = torch.empty(self.tokens, self.rows, device=self.x.device, dtype=torch.bfloat16)
        try:
            torch.cuda.synchronize()
            started = time.perf_counter()
            pm.prefill_linear(self.x, self.weight, config, out)
            torch.cuda.synchronize()
            first_call_s = time.perf_counter() - started  # includes the compile, once per (config, bits)
            error = relative_error(out, self.reference)
            if not error < MAX_REL_ERR:
                print(f"{self.name:>18} T={self.tokens:<4} {'fused':>18} {config.label():>20} MISMATCH rel err {error:.1e}: skipped")
                results.append(dict(shape=self.name, T=self.tokens, method="fused", config=config.label(), error=f"rel err {error:.2e}"))
                return
            us = median_us(lambda: pm.prefill_linear(self.x, self.weight, config, out))
        except Exception as failure:  # out of shared memory, a compile error: print it and go on
            print(f"{self.name:>18} T={self.tokens:<4} {'fused':>18} {config.label():>20} FAILED {type(failure).__name__}: {str(failure)[:160]}")
            results.append(dict(shape=self.name, T=self.tokens, method="fused", config=config.label(),
                                error=f"{type(failure).__name__}: {str(failure)[:300]}"))
            return
        note = f"  (first call {first_call_s:.2f} s)" if table else ""
        self.record(results, "fused (table)" if table else "fused", us, config=config.label(), table=table,
                    rel_err=float(f"{error:.2e}"), first_call_s=round(first_call_s, 3), note=note)


def best_per_case(results: list) -> list[dict]:
    """The fastest fused config of each (shape, T), beside the table's and (a)'s time."""
    best = []
    for name, *_ in SHAPES:
        for tokens in TOKENS:
            rows = [r for r in results if r["shape"] == name and r["T"] == tokens and "us" in r]
            fused = [r for r in rows if r["method"].startswith("fused")]
            if not fused:
                continue
            winner = min(fused, key=lambda r: r["us"])
            table = next((r for r in fused if r.get("table")), None)
            baseline = next((r for r in rows if r["method"] == "dequantize+linear"), None)
            best.append(dict(shape=name, T=tokens, best_config=winner["config"], best_us=winner["us"],
                             table_config=table and table["config"], table_us=table and table["us"],
                             dequantize_linear_us=baseline and baseline["us"],
                             speedup=baseline and round(baseline["us"] / winner["us"], 3)))
    return best


def main() -> None:
    device = torch.device("cuda")
    budget = Budget(float(os.environ.get("BENCH_BUDGET_S", "60")))
    print(f"{torch.cuda.get_device_name(device)}; budget {budget.seconds:.0f} s; x bf16, group {GROUP}")
    results: list[dict] = []
    cases = []
    for name, rows, columns, bits in SHAPES:  # first pass: (a), (c), the table
        for tokens in TOKENS:
            if not budget.allows():
                continue
            case = Case(name, rows, columns, bits, tokens, device)
            cases.append(case)
            case.time_unfused(results)
            case.time_fused(results, pm.prefill_config(tokens, rows, bits, GROUP), table=True)
    for case in cases:  # second pass: the others
        table = pm.prefill_config(case.tokens, case.rows, case.bits, GROUP)
        for config in CANDIDATES:
            if config != table and fits(config, case.tokens) and budget.allows():
                case.time_fused(results, config, table=False)
    best = best_per_case(results)
    print("\nbest fused config per case:")
    for row in best:
        print(f"{row['shape']:>18} T={row['T']:<4} best {row['best_config']:>20} {row['best_us']:8.1f} us "
              f"(table {row['table_config']} {row['table_us']} us; dequantize+linear {row['dequantize_linear_us']} us; "
              f"{row['speedup']}x)")
    if budget.left_out:
        print(f"budget spent: {budget.left_out} measurements left out (raise BENCH_BUDGET_S)")
    if os.environ.get("BENCH_JSON"):
        with open(os.environ["BENCH_JSON"], "w") as out:
            json.dump(dict(device=torch.cuda.get_device_name(device), budget_s=budget.seconds, left_out=budget.left_out,
                           table=[dict(most_tokens=most, bits2=asdict(two), bits4=asdict(four))
                                  for most, two, four in pm.CONFIG_TABLE],
                           results=results, best=best), out, indent=1)
        print(f"wrote {os.environ['BENCH_JSON']}")


if __name__ == "__main__":
    main()
