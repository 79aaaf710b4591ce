"""The CPU runner of placement run/auto inside the engine: tokens/s and the runner's measured time
per expert for lru and lru+prefetch with placement run (fewer torch threads too), auto and copy
on one engine, then the runner alone on an idle engine; to see what a CPU expert costs while the
copy stream and the GPU loop run beside it. K = 4, a 16-token prompt, 4 untimed and 12 timed
tokens each (teacher-forced).

    PYTHONPATH=. python3 scripts/cpu_runner_contention.py STORE [--device cuda]"""

from __future__ import annotations

import argparse
import time

import torch

from coordinator.runtime.engine import Engine
from coordinator.runtime.engine_options import EngineOptions

RUNS = (("lru", "run", 16), ("lru+prefetch", "run", 16), ("lru", "run", 8), ("lru", "run", 12),
        ("lru+prefetch", "auto", 16), ("lru+prefetch", "copy", 16))  # (mode, placement, runner threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with Engine.from_options(args.store, EngineOptions(device=args.device, cache_experts=4, placement="run")) as engine:
        started = time.perf_counter()
        engine.prepare_runs()
        print(f"prepare_runs {time.perf_counter() - started:.1f} s", flush=True)
        runner = engine._runner
        prompt = torch.randint(3, engine.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        for mode, placement, threads in RUNS:
            torch.set_num_threads(threads)  # the runner's experts run on this thread
            engine.use_cache_mode(mode, placement)
            with engine.forced_decode(prompt, 40) as run:
                run.prefill()
                for i in range(4):
                    run.step(prompt[i])
                runner._seconds = None
                sync()
                started = time.perf_counter()
                for i in range(12):
                    run.step(prompt[i])
                sync()
                each = (time.perf_counter() - started) / 12
            ms = f"{runner._seconds * 1e3:.2f}" if runner._seconds else "-"
            print(f"{mode:13s} {placement:5s} threads {threads:2d}: {1 / each:6.2f} tok/s, runner {ms} ms/expert", flush=True)
        hidden = torch.randn(1, engine.config.hidden_size, dtype=engine.dtype)
        weights = torch.ones(1, 2)
        c = engine.config
        for threads in (16, 8):
            torch.set_num_threads(threads)
            for _ in range(3):
                runner.start(c.moe_layers[0], [0, 1], hidden, weights).result()
            started = time.perf_counter()
            for i in range(10):
                runner.start(c.moe_layers[i % len(c.moe_layers)], [i % c.num_experts, (i + 3) % c.num_experts], hidden, weights).result()
            print(f"runner alone threads {threads}: {(time.perf_counter() - started) / 20 * 1e3:.2f} ms/expert")


if __name__ == "__main__":
    main()
