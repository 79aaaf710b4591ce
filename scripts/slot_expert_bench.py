"""Times the in-place slot expert kernels (coordinator/runtime/kernels/slot_experts.py) on
Mixtral-8x7B expert shapes (2-bit HQQ g64 by default, bf16, batch 1) against the engine's gemv,
each call captured in a CUDA graph over 8 slots (no launch cost, no L2 reuse), and prints us,
GB/s and the share of 4.8 TB/s. Sweeps block shapes and the STREAM / PREFETCH switches, then times
the grouped top-2 step (w13+SiLU, w2, sum) with the module's defaults and with the sweeps' best.
    python scripts/slot_expert_bench.py        (on a CUDA machine; BITS=4 for 4-bit)"""

import itertools
import os

import torch
import triton
import triton.language as tl

from common.model_config import ModelConfig
from common.quantization import QuantSpec
from common.store.blob_layout import BlobLayout
from coordinator.runtime.kernels import quantized_linear as ql
from coordinator.runtime.kernels import slot_experts as se

PEAK_GBPS = 4800  # H200 HBM3e
SLOTS = 8


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


def main() -> None:
    device = torch.device("cuda")
    bits = int(os.environ.get("BITS", "2"))
    config = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, rms_norm_eps=1e-5, rope_theta=1e6,
                         max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    layout = BlobLayout.for_expert(config, QuantSpec(bits, 64), torch.bfloat16)
    memory = torch.randint(0, 256, (SLOTS, layout.nbytes), dtype=torch.uint8, device=device)
    views = [layout.views(memory[s]) for s in range(SLOTS)]
    for view in views:
        for matrix in (view.w13, view.w2):
            matrix.scale.copy_(torch.rand(matrix.scale.shape, device=device) * 0.01)
            matrix.zero.copy_(torch.rand(matrix.zero.shape, device=device) * (2**bits - 1))
    size = {name: sum(t.numel() * t.element_size() for t in (m.planes[0], m.scale, m.zero))
            for name, m in (("w13", views[0].w13), ("w2", views[0].w2))}
    x = {"w13": torch.randn(1, 4096, device=device), "w2": torch.randn(2, 14336, device=device) * 0.1}
    x_sums = {name: value.view(value.shape[0], -1, 16).sum(-1) for name, value in x.items()}
    print(f"blob {layout.nbytes / 1e6:.1f} MB, w13 {size['w13'] / 1e6:.1f} MB, w2 {size['w2'] / 1e6:.1f} MB, {bits}-bit")
    for name in ("w13", "w2"):
        vector = x[name][0].to(torch.bfloat16)
        out = torch.empty(getattr(views[0], name).shape[0], device=device, dtype=torch.bfloat16)
        print(line(f"engine gemv {name}", graph_us(lambda i: ql.gemv(vector, getattr(views[i], name), out), SLOTS), size[name]))

    pairs = [torch.tensor([2 * i % SLOTS, (2 * i + 1) % SLOTS], device=device) for i in range(4)]
    singles = [torch.tensor([i], device=device) for i in range(SLOTS)]
    weights = torch.ones(1, 2, device=device)

    def time_kernel(name, gated, k, block_o, block_j, warps, unroll, split, stream, prefetch):
        m = se._matrix(layout, name)
        rows = m.rows // 2 if gated else m.rows
        out = torch.empty(k * split, rows, device=device)
        slot_sets = pairs if k == 2 else singles

        def work(i):
            se._slot_gemv_kernel[(rows // block_o, split, k)](
                x[name], x_sums[name], memory, slot_sets[i % len(slot_sets)], weights, out, split,
                X_STRIDE=0 if name == "w13" else 14336, NBYTES=layout.nbytes, CODES=m.codes, SCALE=m.scale,
                ZERO=m.zero, O=rows, P=m.packed, NG=m.groups, WIDTH=bits, GROUP=64, BLOCK_O=block_o,
                BLOCK_J=block_j, GATED=gated, ROUND=tl.bfloat16, STREAM=stream, PREFETCH=prefetch, UNROLL=unroll,
                num_warps=warps)
        return graph_us(work, 8)

    best = {}
    for name, gated, k, splits in (("w13", True, 2, (1,)), ("w2", False, 2, (1, 2, 4, 8)), ("w13", False, 1, (1, 2)),
                                   ("w2", False, 1, (1, 4, 8))):
        results = []
        shapes = [(o, j, w, 1) for o, j, w in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8))
                  if o * j // 16 >= 32 * w and o * j <= (8192 if gated else 32768)]
        shapes += [(32 * w, 16, w, u) for w in (4, 8) for u in (1, 2, 4, 8)]  # one 16-byte chunk per row per thread
        for (block_o, block_j, warps, unroll), split in itertools.product(shapes, splits):
            if (m := se._matrix(layout, name)).packed % (block_j * unroll):
                continue
            us = time_kernel(name, gated, k, block_o, block_j, warps, unroll, split, False, False)
            results.append((us, block_o, block_j, warps, unroll, split, False, False))
        results.sort()
        for _, block_o, block_j, warps, unroll, split, _, _ in results[:3]:  # the switches on the best three
            for stream, prefetch in ((False, True), (True, False)):
                us = time_kernel(name, gated, k, block_o, block_j, warps, unroll, split, stream, prefetch)
                results.append((us, block_o, block_j, warps, unroll, split, stream, prefetch))
        results.sort()
        nbytes = k * size[name]
        for us, *knobs in results[:6]:
            print(line(f"slot {name}{' gated' if gated else ''} k={k} BO,BJ,warps,unroll,split,stream,prefetch={knobs}",
                       us, nbytes))
        best[(name, k)] = results[0]

    def grouped(tag):
        run = se.SlotExperts(layout, 2, device, torch.bfloat16)
        moe_in = x["w13"].to(torch.bfloat16)
        out = torch.zeros(1, 4096, device=device, dtype=torch.bfloat16)
        us = graph_us(lambda i: run(moe_in, memory, pairs[i % 4], weights, out), 4)
        print(line(f"grouped top-2 step ({tag})", us, 2 * (size["w13"] + size["w2"])))

    grouped("module defaults")
    _, o13, j13, w13, u13, _, s13, p13 = best[("w13", 2)]
    _, o2, j2, w2, u2, split2, s2, p2 = best[("w2", 2)]
    se.W13_BLOCK_O, se.W13_BLOCK_J, se.W13_WARPS, se.W13_UNROLL = o13, j13, w13, u13
    se.W2_BLOCK_O, se.W2_BLOCK_J, se.W2_WARPS, se.W2_UNROLL, se.W2_SPLIT = o2, j2, w2, u2, split2
    se.STREAM, se.PREFETCH = s13 and s2, p13 and p2  # one switch for both launches
    grouped(f"sweeps' best: w13 {(o13, j13, w13, u13)} w2 {(o2, j2, w2, u2, split2)} stream {se.STREAM} prefetch {se.PREFETCH}")


if __name__ == "__main__":
    main()
