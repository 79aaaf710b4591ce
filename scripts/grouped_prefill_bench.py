"""Times one resident prompt MoE layer two ways on a GPU, random HQQ experts in a [E, nbytes] slot
memory and a random routing of T tokens:
  (a) per expert: what moe.MoEBlock.forward did before the grouped step, after its routing read-
      back: each expert's rows gathered, expert_forward through the fused quantized linear
      (prefill_matmul where it pays, else dequantize + F.linear), weighted, index_add;
  (b) grouped: kernels/grouped_prefill.GroupedExperts at its default config ("table") and at a
      short list of others.
Both as wall time of the host issuing the layer and the GPU finishing it (the host's share is
what (b) removes), the median of REPEATS. Shapes: Mixtral-8x7B (E 8, k 2, 2-bit) and Qwen3-30B-A3B
(E 128, k 8, 4-bit), group 64; T in 128, 512, 2048. Stops after BENCH_BUDGET_S (default 60) s.
    PYTHONPATH=. python3 scripts/grouped_prefill_bench.py          (on a CUDA machine)"""

from __future__ import annotations

import os
import statistics
import time

import torch

from common.expert_ffn import expert_forward
from common.model_config import ModelConfig
from common.quantization import QuantSpec
from common.store.blob_layout import BlobLayout
from coordinator.runtime.kernels import grouped_prefill as gp
from coordinator.runtime.kernels import quantized_linear_for
from coordinator.runtime.kernels.prefill_matmul import PrefillConfig

SHAPES = (("mixtral-8x7b", 4096, 14336, 8, 2, 2), ("qwen3-30b-a3b", 2048, 768, 128, 8, 4))  # H, F, E, k, bits
TOKENS = (128, 512, 1024, 2048)
REPEATS = 5
CANDIDATES = tuple(PrefillConfig(*c) for c in (  # (BM, BN, BK, warps, stages, swap_ab)
    (64, 128, 64, 4, 3, True), (128, 128, 64, 8, 3, True), (64, 128, 32, 4, 3, True), (128, 64, 64, 4, 3, True),
    (64, 64, 64, 4, 4, True), (128, 64, 64, 4, 4, True), (128, 64, 32, 4, 3, True), (256, 64, 64, 8, 3, True),
))


def layout_for(hidden: int, ffn: int, experts: int, top_k: int, bits: int) -> BlobLayout:
    config = ModelConfig(vocab_size=16, hidden_size=hidden, intermediate_size=ffn, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=hidden, num_experts=experts, top_k=top_k, rms_norm_eps=1e-5,
                         rope_theta=1e4, max_position_embeddings=8, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return BlobLayout.for_expert(config, QuantSpec(bits, 64), torch.float16)


def random_memory(layout: BlobLayout, experts: int, device) -> torch.Tensor:
    memory = torch.randint(0, 256, (experts, layout.nbytes), dtype=torch.uint8, device=device)
    for e in range(experts):
        views = layout.views(memory[e])
        for matrix in (views.w13, views.w2):
            matrix.scale.copy_(torch.rand_like(matrix.scale, dtype=torch.float32).mul_(0.01))
            matrix.zero.copy_(torch.rand_like(matrix.zero, dtype=torch.float32).mul_(2 ** layout.spec.bits - 1))
    return memory


def per_expert(views, x, experts, weights, linear) -> torch.Tensor:
    """(a): the read-back, then the per-expert loop (views: each expert's, made once, as the cache's are)."""
    chosen = experts.view(-1).tolist()  # the routing read-back (one sync)
    k = experts.shape[1]
    out = torch.zeros_like(x)
    by_expert: dict[int, list[int]] = {}
    for flat, expert in enumerate(chosen):
        by_expert.setdefault(expert, []).append(flat)
    flat_all = torch.tensor([f for e in sorted(by_expert) for f in by_expert[e]], device=x.device)
    rows_all, route = flat_all // k, weights.view(-1)[flat_all]
    begin = 0
    for expert in sorted(by_expert):
        end = begin + len(by_expert[expert])
        rows = rows_all[begin:end]
        ys = expert_forward(x[rows], views[expert], linear)
        out.index_add_(0, rows, (ys * route[begin:end, None]).to(out.dtype))
        begin = end
    return out


def wall_ms(fn) -> float:
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda")
    budget = float(os.environ.get("BENCH_BUDGET_S", "60"))
    started = time.perf_counter()
    linear = quantized_linear_for(device)
    print(f"{'shape':14} {'T':>5} {'path':28} {'ms':>8} {'vs (a)':>7} {'rel err':>8}")
    for name, hidden, ffn, num_experts, top_k, bits in SHAPES:
        layout = layout_for(hidden, ffn, num_experts, top_k, bits)
        memory = random_memory(layout, num_experts, device)
        slots = torch.arange(num_experts, device=device)
        views = [layout.views(memory[e]) for e in range(num_experts)]
        for tokens in TOKENS:
            if time.perf_counter() - started > budget:
                print(f"budget of {budget:.0f} s spent: stopping")
                return
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
            experts = torch.rand(tokens, num_experts, device=device).topk(top_k, dim=1).indices
            weights = torch.softmax(torch.randn(tokens, top_k, device=device), 1)
            reference = per_expert(views, x, experts, weights, linear)
            base = wall_ms(lambda: per_expert(views, x, experts, weights, linear))
            print(f"{name:14} {tokens:5} {'(a) per expert':28} {base:8.3f} {1.0:7.2f}")
            for config in (None, *CANDIDATES):
                if time.perf_counter() - started > budget:
                    break
                step = gp.GroupedExperts(layout, config)
                label = "table " + gp.grouped_config(tokens * top_k, num_experts, bits, 64).label() if config is None else config.label()
                try:
                    out = torch.zeros_like(x)
                    step(x, experts, weights, memory, slots, out)
                    error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                    ms = wall_ms(lambda: step(x, experts, weights, memory, slots, torch.zeros_like(x)))
                except Exception as exc:  # a config that does not compile here: say so, go on
                    print(f"{name:14} {tokens:5} (b) {label:24} failed: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                print(f"{name:14} {tokens:5} (b) {label:24} {ms:8.3f} {base / ms:7.2f} {error:8.1e}")


if __name__ == "__main__":
    main()
