"""A rough event model of offloaded decode (not a measurement): what placement policies could give
on random routing, for choosing auto's rule before GPU time is spent on it.

One token is L layers in a row; a layer's experts are needed once its plan is read, and the
next layer starts when its GPU work and its CPU runs are both done. One FIFO copy link moves
experts into K slots per layer (LRU, a slot loading is not evicted); one CPU runner takes a
layer's runs one after another. The lookahead guesses the next layer's top-k, each right with
probability ACCURACY. Policies:

    copy      every miss and every guess is copied (placement copy)
    auto-old  the demand misses that would wait longer for a copy than a run go to the CPU; every
              guess is copied (placement auto before its guesses were weighed)
    weighed   auto-old, and a guess is copied only if it lands by its layer's start (at the pace
              measured so far) plus `margin` runs' time (placement auto now, margin 1)
    split     weighed, and a guess left is copied as its w2 alone (a third of the bytes) when that
              lands in time: the CPU then runs only its w13 (not built; the model says what it would add)

Calibrated by one figure: with a 1.0 ms copy, copy gives ~25.5 tok/s, where the H200 measured
25.4-25.9 (BENCHMARKS.md). Everything else here is the model's, not the machine's.

    python -m scripts.placement_model [--copy-ms 1.0,1.1] [--run-ms 1.3,1.6,0.8] [--margins 0.5,1,1.5]
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict

LAYERS, EXPERTS, SLOTS, TOP_K = 32, 8, 4, 2
GPU_EXPERT_MS, LAYER_MS, HEAD_MS, RUN_START_MS, W2_SHARE = 0.07, 0.17, 0.4, 0.05, 1 / 3
ACCURACY = 0.9
POLICIES = ("copy", "auto-old", "weighed", "split")


def tokens_per_s(policy: str, *, copy_ms: float, run_ms: float, margin: float = 1.0, tokens: int = 300,
                 warm_up: int = 20, seed: int = 0) -> float:
    rng = random.Random(seed)
    ready = [OrderedDict((e, 0.0) for e in rng.sample(range(EXPERTS), SLOTS)) for _ in range(LAYERS)]  # expert -> ms it lands
    w2_ready: list[dict[int, float]] = [{} for _ in range(LAYERS)]  # split: experts whose w2 alone is (being) copied
    routes = [[rng.sample(range(EXPERTS), TOP_K) for _ in range(LAYERS)] for _ in range(tokens)]
    link_free = now = 0.0
    pace, last = None, None  # ms per layer, measured as auto measures it
    started = 0.0
    for token in range(tokens):
        if token == warm_up:
            started = now
        for layer in range(LAYERS):
            if last is not None and layer > last[0]:
                each = (now - last[1]) / (layer - last[0])
                pace = each if pace is None else 0.9 * pace + 0.1 * each
            last = (layer, now)
            cache, needed = ready[layer], routes[token][layer]
            misses = [e for e in needed if e not in cache]
            split = [e for e in misses if e in w2_ready[layer]]
            whole = [e for e in misses if e not in split]
            on_cpu = []
            if policy != "copy":
                copy_busy, run_busy = max(0.0, link_free - now), 0.0
                for expert in whole:
                    if run_busy + run_ms < copy_busy + copy_ms:
                        run_busy += run_ms
                        on_cpu.append(expert)
                    else:
                        copy_busy += copy_ms
            for expert in needed:
                if expert in cache:
                    cache.move_to_end(expert)
            for expert in whole:
                if expert not in on_cpu:
                    del cache[next(e for e in cache if e not in needed)]
                    link_free = max(link_free, now) + copy_ms
                    cache[expert] = link_free
            if layer + 1 < LAYERS:  # the lookahead stops at the token's last layer
                link_free = _prefetch(policy, rng, routes[token][layer + 1], ready[layer + 1], w2_ready[layer + 1],
                                      now=now, link_free=link_free, pace=pace, copy_ms=copy_ms, run_ms=run_ms, margin=margin)
            on_device = [e for e in needed if e not in on_cpu and e not in split]
            gpu_done = max([now] + [cache[e] for e in on_device]) + GPU_EXPERT_MS * len(on_device)
            cpu_done = now
            if on_cpu or split:
                cpu_done += RUN_START_MS + run_ms * len(on_cpu) + (1 - W2_SHARE) * run_ms * len(split)
            if split:  # each split expert's w2 on the GPU once its copy and the CPU's w13 are there
                cpu_done = max(cpu_done, max(w2_ready[layer][e] for e in split)) + 0.03 * len(split)
            now = max(gpu_done, cpu_done) + LAYER_MS
        now += HEAD_MS
    return 1000 * (tokens - warm_up) / (now - started)


def _prefetch(policy, rng, wanted, cache, w2_ready, *, now, link_free, pace, copy_ms, run_ms, margin) -> float:
    """Copy the next layer's guesses as `policy` would; the link's new free time."""
    guesses = [g if rng.random() < ACCURACY else rng.choice([e for e in range(EXPERTS) if e not in wanted]) for g in wanted]
    w2_ready.clear()
    for guess in guesses:
        if guess in cache:
            cache.move_to_end(guess)
            continue
        queued = max(0.0, link_free - now)
        if policy in ("weighed", "split") and pace is not None and queued + copy_ms > pace + margin * run_ms:
            if policy == "split" and queued + W2_SHARE * copy_ms <= pace + margin * (1 - W2_SHARE) * run_ms:
                link_free = max(link_free, now) + W2_SHARE * copy_ms
                w2_ready[guess] = link_free
            continue
        victims = [e for e in cache if cache[e] <= now and e not in guesses]
        if victims:
            del cache[victims[0]]
            link_free = max(link_free, now) + copy_ms
            cache[guess] = link_free
    return link_free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copy-ms", default="1.0,1.1", help="one expert's copy, ms (comma-separated)")
    parser.add_argument("--run-ms", default="1.3,1.6,0.8", help="one expert on the CPU, ms (comma-separated)")
    parser.add_argument("--margins", default="0.5,1,1.5", help="weighed/split: runs' time a copy may land after its layer starts")
    args = parser.parse_args()
    margins = [float(m) for m in args.margins.split(",")]
    print("model tok/s (not measured): copy and auto-old, then weighed and split at each margin")
    print(f"{'copy ms':>7} {'run ms':>6} {'copy':>6} {'auto-old':>8}  " + "  ".join(f"{'weighed ' + str(m):>12}" for m in margins)
          + "  " + "  ".join(f"{'split ' + str(m):>10}" for m in margins))
    for copy_ms in (float(c) for c in args.copy_ms.split(",")):
        for run_ms in (float(r) for r in args.run_ms.split(",")):
            row = [tokens_per_s(p, copy_ms=copy_ms, run_ms=run_ms) for p in ("copy", "auto-old")]
            weighed = [tokens_per_s("weighed", copy_ms=copy_ms, run_ms=run_ms, margin=m) for m in margins]
            split = [tokens_per_s("split", copy_ms=copy_ms, run_ms=run_ms, margin=m) for m in margins]
            print(f"{copy_ms:7.2f} {run_ms:6.2f} {row[0]:6.1f} {row[1]:8.1f}  " + "  ".join(f"{w:12.1f}" for w in weighed)
                  + "  " + "  ".join(f"{s:10.1f}" for s in split))


if __name__ == "__main__":
    main()
