"""Times the in-place slot expert kernels (coordinator/runtime/kernels/slot_experts.py) on one GPU:
for each family's expert shapes (Mixtral-8x7B: 2-bit HQQ g64, top-2; Qwen3-30B-A3B: 4-bit g64,
top-8, hidden 2048, expert FFN 768), each kernel variant (slot_experts.VARIANTS: v1, v2, v3, v4; v4 only where it
applies, 2-bit: for Qwen3's 4-bit codes "v4" would run v1, so it is skipped) over a
short list of block shapes for the w13 kernel alone (with the SiLU gate) and the w2 kernel alone
(split along its input), then the whole top-k step (x prepared, w13, w2, the sums: what the
decoder runs) with the module's shapes and with the best.
Every call is captured in a CUDA graph whose calls go round more slots than L2 holds (no launch
cost, no L2 reuse). Prints us, GB/s and the share of 4.8 TB/s, and per variant the lines to paste
into slot_experts.py; writes the rows as JSON.

A shape that fails to compile or run is printed and skipped; the sweeps stop at BENCH_BUDGET_S
seconds (default 120; each (family, variant, matrix) gets its share of what is left, and the
module's shape always runs). Runs in about BENCH_BUDGET_S + 20 s.
    PYTHONPATH=. python3 scripts/slot_expert_bench.py
    FAMILIES=mixtral BENCH_BUDGET_S=60 BENCH_JSON=out.json PYTHONPATH=. python3 scripts/slot_expert_bench.py
    FAMILIES=mixtral BENCH_VARIANTS=v1,v4 PYTHONPATH=. python3 scripts/slot_expert_bench.py  # some variants only
MOE_EDGE_SLOT_V4_ASM=0 times v4's plain-Triton path instead of its PTX (the same math). With four
variants a 30 s budget leaves v4 little more than its module shapes (each compiles in seconds);
for v4's sweep: FAMILIES=mixtral BENCH_VARIANTS=v1,v4 BENCH_BUDGET_S=60."""

import json
import os
import time
import traceback
from dataclasses import dataclass

import torch

from common.model_config import ModelConfig
from common.quantization import QuantSpec
from common.store.blob_layout import BlobLayout
from coordinator.runtime.kernels import slot_experts as se

PEAK_GBPS = 4800  # H200 HBM3e


def graph_us(work, calls: int, replays: int = 20) -> float:
    """Median us per call of work(i), i < calls, captured once in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            work(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            work(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays / calls)
    return sorted(times)[2]


def line(tag: str, us: float, nbytes: int) -> str:
    gbps = nbytes / us / 1e3
    return f"{tag:<60} {us:7.1f} us {gbps:6.0f} GB/s {100 * gbps / PEAK_GBPS:5.1f}%"


@dataclass(frozen=True)
class Family:
    name: str
    hidden: int
    ffn: int
    bits: int
    top_k: int
    slots: int  # slots in memory: more bytes than L2 (50 MB), a multiple of top_k
    weight: float  # its share of the sweep budget, against the other families'
    # candidate shapes per variant, the likeliest first: w13 (BO, BJ, warps, unroll[, stages]),
    # w2 the same and the split last. The module's own shape is always run first.
    w13: dict[str, list[tuple[int, ...]]]
    w2: dict[str, list[tuple[int, ...]]]


MIXTRAL = Family(
    "mixtral-8x7b 2-bit g64 top-2", 4096, 14336, 2, 2, 8, 2.0,
    w13={"v1": [(64, 64, 4, 1), (32, 64, 4, 1), (128, 64, 8, 1), (64, 128, 4, 1), (32, 128, 4, 1)],
         "v2": [(16, 64, 4, 1, 3), (32, 64, 4, 1, 1), (64, 64, 4, 1, 3), (32, 64, 4, 1, 2), (16, 64, 4, 1, 4),
                (32, 64, 8, 1, 3), (64, 64, 8, 1, 3), (32, 128, 4, 1, 3), (128, 64, 4, 1, 1), (16, 128, 4, 1, 3)],
         "v3": [(32, 32, 2, 1, 3), (32, 64, 4, 1, 2), (64, 32, 4, 1, 2), (32, 32, 2, 1, 1), (32, 16, 1, 1, 2),
                (64, 16, 2, 1, 2), (32, 64, 4, 1, 3), (64, 32, 4, 1, 1), (32, 16, 1, 1, 3)],
         # v4: v3's fields; rows a thread = BO * BJ / 16 / (32 * warps) share the input pairs
         # (STAGES 1 first: cp.async costs v4 ~0.1-0.4 instructions a code in the offline compile)
         "v4": [(32, 64, 4, 1, 1), (128, 32, 4, 1, 1), (64, 64, 4, 1, 2), (64, 32, 4, 1, 1), (64, 64, 8, 1, 1),
                (128, 64, 4, 1, 1), (64, 64, 4, 2, 1), (32, 64, 4, 1, 2)]},
    w2={"v1": [(32, 64, 4, 1, 4), (16, 128, 4, 1, 4), (16, 256, 4, 1, 8), (32, 128, 4, 1, 4), (64, 64, 4, 1, 4)],
        "v2": [(16, 64, 4, 1, 3, 4), (16, 64, 4, 1, 3, 8), (32, 64, 4, 1, 3, 2), (32, 64, 4, 1, 1, 4),
               (64, 64, 4, 1, 3, 4), (32, 64, 4, 1, 2, 8), (16, 128, 4, 1, 3, 4), (32, 64, 8, 1, 3, 4)],
        "v3": [(32, 32, 2, 1, 2, 8), (32, 64, 4, 1, 2, 4), (32, 32, 2, 1, 3, 4), (32, 16, 1, 1, 2, 8),
               (64, 32, 4, 1, 2, 4), (32, 32, 2, 1, 1, 4), (32, 32, 2, 1, 2, 2), (64, 16, 2, 1, 2, 8)],
        "v4": [(128, 32, 4, 1, 1, 4), (64, 32, 4, 1, 1, 8), (256, 32, 4, 1, 1, 8), (128, 32, 4, 1, 2, 8),
               (64, 64, 4, 1, 1, 8), (128, 16, 4, 1, 1, 8), (128, 32, 4, 1, 1, 16)]})
QWEN3 = Family(
    "qwen3-30b-a3b 4-bit g64 top-8", 2048, 768, 4, 8, 128, 1.0,
    w13={"v1": [(32, 64, 4, 1), (16, 64, 4, 1), (16, 128, 4, 1), (64, 64, 4, 1)],
         "v2": [(16, 64, 4, 1, 3), (32, 64, 4, 1, 3), (8, 64, 4, 1, 3), (16, 64, 4, 1, 1), (16, 128, 4, 1, 3)],
         "v3": [(16, 64, 2, 1, 2), (32, 64, 4, 1, 2), (16, 32, 1, 1, 2), (16, 64, 2, 1, 3), (32, 32, 2, 1, 1)]},
    w2={"v1": [(32, 64, 4, 1, 2), (16, 64, 4, 1, 2), (16, 128, 4, 1, 3), (64, 64, 4, 1, 1)],
        "v2": [(32, 64, 4, 1, 3, 2), (16, 64, 4, 1, 3, 2), (32, 64, 4, 1, 3, 1), (16, 64, 4, 1, 1, 3),
               (64, 64, 4, 1, 3, 1)],
        "v3": [(32, 32, 2, 1, 2, 1), (32, 16, 1, 1, 2, 2), (64, 16, 2, 1, 2, 3), (32, 16, 1, 1, 1, 3),
               (32, 32, 2, 1, 1, 3)]},
)
FAMILIES = {"mixtral": MIXTRAL, "qwen3": QWEN3}


def bench_variants() -> list[str]:
    """The variants to time: BENCH_VARIANTS (comma-separated, e.g. v1,v4), all of them otherwise."""
    chosen = os.environ.get("BENCH_VARIANTS")
    return [v for v in chosen.split(",") if v in se.VARIANTS] if chosen else list(se.VARIANTS)


class Bench:
    """One family's slot memory, inputs and slot sets; times a variant's calls with given shapes."""

    def __init__(self, family: Family, device: torch.device) -> None:
        self.family, self.device = family, device
        config = ModelConfig(vocab_size=32000, hidden_size=family.hidden, intermediate_size=family.ffn, num_layers=1,
                             num_heads=32, num_kv_heads=8, head_dim=128, num_experts=family.slots, top_k=family.top_k,
                             rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096, sliding_window=None,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        self.layout = BlobLayout.for_expert(config, QuantSpec(family.bits, 64), torch.bfloat16)
        self.memory = torch.randint(0, 256, (family.slots, self.layout.nbytes), dtype=torch.uint8, device=device)
        for s in range(family.slots):
            view = self.layout.views(self.memory[s])
            for matrix in (view.w13, view.w2):
                matrix.scale.copy_(torch.rand(matrix.scale.shape, device=device) * 0.01)
                matrix.zero.copy_(torch.rand(matrix.zero.shape, device=device) * (2**family.bits - 1))
        view = self.layout.views(self.memory[0])
        self.size = {name: sum(t.numel() * t.element_size() for t in (m.planes[0], m.scale, m.zero))
                     for name, m in (("w13", view.w13), ("w2", view.w2))}  # bytes of one expert's matrix
        k = family.top_k
        self.calls = family.slots // k  # a graph's calls read every slot once
        self.slot_sets = [torch.arange(i * k, (i + 1) * k, device=device) for i in range(self.calls)]
        self.weights = torch.full((1, k), 1.0 / k, device=device)
        self.x = torch.randn(1, family.hidden, device=device, dtype=torch.bfloat16)
        self.out = torch.zeros(1, family.hidden, device=device, dtype=torch.bfloat16)

    def experts(self, variant: str, shapes13=None, shapes2=None) -> se.SlotExperts:
        default13, default2 = se.default_shapes(variant)
        return se.SlotExperts(self.layout, self.family.top_k, self.device, torch.bfloat16, variant,
                              (shapes13 or default13, shapes2 or default2))

    def time(self, variant: str, matrix: str, shapes13=None, shapes2=None) -> tuple[float, tuple[int, ...]]:
        """us per call of the w13 kernel, the w2 kernel or the whole step ("step": x prepared, both
        kernels, the sums), and the shape that ran (SlotExperts fits the blocks to the matrix)."""
        run = self.experts(variant, shapes13, shapes2)
        ran = dict(zip(("w13", "w2"), run.shapes_ran())).get(matrix, ())
        if matrix != "step":  # real inputs for the kernels alone (x and its sums, the w2 input), made once
            run.gate_up(self.x, self.memory, self.slot_sets[0])
        work = {"w13": lambda i: run.gate_up_kernel(self.memory, self.slot_sets[i]),
                "w2": lambda i: run.down_kernel(self.memory, self.slot_sets[i], self.weights),
                "step": lambda i: run(self.x, self.memory, self.slot_sets[i], self.weights, self.out)}[matrix]
        return graph_us(work, self.calls), ran

    def nbytes(self, matrix: str) -> int:
        per_expert = self.size["w13"] + self.size["w2"] if matrix == "step" else self.size[matrix]
        return self.family.top_k * per_expert


def paste_lines(variant: str, best13: tuple[int, ...], best2: tuple[int, ...]) -> list[str]:
    if variant == "v1":
        return [f"W13_BLOCK_O, W13_BLOCK_J, W13_WARPS, W13_UNROLL = {', '.join(map(str, best13))}",
                f"W2_BLOCK_O, W2_BLOCK_J, W2_WARPS, W2_UNROLL, W2_SPLIT = {', '.join(map(str, best2))}"]
    return [f"V{variant[1:]}_W13 = {best13}", f"V{variant[1:]}_W2 = {best2}"]


def run_family(family: Family, device: torch.device, deadline: float, weight_left: float, rows: list[dict]) -> float:
    """Sweeps and times one family; each of its (variant, matrix) sweeps ends at its share of the
    time left before `deadline` (its weight over weight_left). Returns the weight still to come."""
    bench = Bench(family, device)
    print(f"\n== {family.name}: blob {bench.layout.nbytes / 1e6:.1f} MB, w13 {bench.size['w13'] / 1e6:.1f} MB, "
          f"w2 {bench.size['w2'] / 1e6:.1f} MB per expert, {family.slots} slots, {bench.calls} calls a graph")
    best = {}
    variants = [v for v in bench_variants() if v != "v4" or se.v4_applies(bench.layout, torch.bfloat16)]
    if len(variants) < len(bench_variants()):
        print("  v4: not for these codes (it would run v1), skipped")
        weight_left -= family.weight * 2
    for variant in variants:
        default13, default2 = se.default_shapes(variant)
        for matrix in ("w13", "w2"):
            default = default13 if matrix == "w13" else default2
            candidates = [default] + [c for c in getattr(family, matrix)[variant] if c != default]
            share = family.weight / max(weight_left, family.weight)
            share_end = time.monotonic() + max(0.0, deadline - time.monotonic()) * share
            weight_left -= family.weight
            results = []
            for n, shape in enumerate(candidates):
                if n and time.monotonic() > share_end:
                    print(f"  {variant} {matrix}: budget spent, {len(candidates) - n} shapes not run")
                    break
                args = (shape, None) if matrix == "w13" else (None, shape)
                try:
                    us, ran = bench.time(variant, matrix, *args)
                except Exception as error:  # a shape Triton cannot compile (or run) here: say so, go on
                    print(f"  {variant} {matrix} {shape}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
                    continue
                if any(ran == done for _, done, _ in results):
                    continue  # fitted to the same shape as one already timed
                results.append((us, ran, shape))
                nbytes = bench.nbytes(matrix)
                print(line(f"  {variant} {matrix} {ran}{' (module)' if n == 0 else ''}", us, nbytes))
                rows.append(dict(family=family.name, variant=variant, matrix=matrix, shape=list(ran), us=us,
                                 gbps=nbytes / us / 1e3))
            best[(variant, matrix)] = min(results)[2] if results else default  # as asked: fitted anew per matrix
    print(f"-- {family.name}: the top-{family.top_k} step (x prepared, w13 + gate, w2, sum), "
          f"{bench.nbytes('step') / 1e6:.1f} MB")
    print(f"  {'variant':<8}{'shapes (w13; w2)':<52}{'us/step':>10}{'GB/s':>9}{'of 4.8 TB/s':>13}")
    for variant in variants:
        module = bench.experts(variant).shapes_ran()  # as fitted to this family's matrices
        for tag, shapes13, shapes2 in (("module", None, None), ("best", best[(variant, "w13")], best[(variant, "w2")])):
            if tag == "best" and bench.experts(variant, shapes13, shapes2).shapes_ran() == module:
                print(f"  {variant:<8}best = module")
                continue
            try:
                us, _ = bench.time(variant, "step", shapes13, shapes2)
            except Exception as error:
                print(f"  {variant} {tag}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
                continue
            shown = module if tag == "module" else (shapes13, shapes2)
            gbps = bench.nbytes("step") / us / 1e3
            print(f"  {variant:<8}{tag + ' ' + str(shown[0]) + '; ' + str(shown[1]):<52}{us:10.1f}{gbps:9.0f}"
                  f"{100 * gbps / PEAK_GBPS:12.1f}%")
            rows.append(dict(family=family.name, variant=variant, matrix="step", tag=tag, shape=[list(s) for s in shown],
                             us=us, gbps=gbps))
    print(f"-- {family.name}: best shapes, to paste into slot_experts.py (module constants serve every family)")
    for variant in variants:
        for text in paste_lines(variant, best[(variant, "w13")], best[(variant, "w2")]):
            print(f"  {variant}: {text}")
    del bench
    torch.cuda.empty_cache()
    return weight_left


def main() -> None:
    device = torch.device("cuda")
    budget = float(os.environ.get("BENCH_BUDGET_S", "120"))
    families = [FAMILIES[name] for name in os.environ.get("FAMILIES", "mixtral,qwen3").split(",")]
    started = time.monotonic()
    deadline = started + budget
    weight_left = sum(family.weight for family in families) * len(bench_variants()) * 2  # one per (variant, matrix)
    rows: list[dict] = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, sweeps within {budget:.0f} s")
    for family in families:
        try:
            weight_left = run_family(family, device, deadline, weight_left, rows)
        except Exception:  # one family's failure (memory, a layout) leaves the other's numbers
            traceback.print_exc()
            weight_left -= family.weight * len(bench_variants()) * 2
    path = os.environ.get("BENCH_JSON", "slot_expert_bench.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n{time.monotonic() - started:.0f} s; rows in {path}")


if __name__ == "__main__":
    main()
