"""Where a decode token's time goes on the GPU: for each cache mode given (resident: the
whole-token graph; lru+prefetch: K = 4), wall ms per token over 16 teacher-forced steps, then a
torch.profiler table of the kernels over 4 more (time and launches per token, the top 28) and the
GPU's busy time per token. What BENCHMARKS.md's kernel counts come from.

    PYTHONPATH=. python3 scripts/profile_decode.py STORE [resident,lru+prefetch] [--device cuda]"""

from __future__ import annotations

import argparse
import time

import torch

from coordinator.runtime.engine import Engine
from coordinator.runtime.engine_options import EngineOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("modes", nargs="?", default="resident", help="comma-separated cache modes (default resident)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with Engine.from_options(args.store, EngineOptions(device=args.device, cache_experts=4)) as engine:
        prompt = torch.randint(3, engine.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        for mode in args.modes.split(","):
            engine.use_cache_mode(mode)
            with engine.forced_decode(prompt, 64) as run:
                run.prefill()
                for i in range(8):  # warm: graphs captured, kernels compiled
                    run.step(prompt[i])
                sync()
                started = time.perf_counter()
                for i in range(16):
                    run.step(prompt[i])
                sync()
                each = (time.perf_counter() - started) / 16
                print(f"== {mode}: {each * 1e3:.2f} ms/token = {1 / each:.1f} tok/s", flush=True)
                steps = 4
                with torch.profiler.profile(activities=activities) as profile:
                    for i in range(steps):
                        run.step(prompt[i])
                    sync()
            kernels = [e for e in profile.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
            launches = sum(e.count for e in kernels) / steps
            print(f"GPU busy {busy:.2f} ms/token, {launches:.0f} kernels+copies/token")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:28]:
                print(f"{e.self_device_time_total / steps / 1e3:8.3f} ms {e.count / steps:7.1f}/tok "
                      f"{e.self_device_time_total / max(e.count, 1):8.1f} us  {e.key[:110]}")


if __name__ == "__main__":
    main()
