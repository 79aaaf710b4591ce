"""On a CUDA machine: every family's tiny random model gives the same greedy tokens on the GPU
(float32, through CUDA graphs) as on the CPU, also with the decode misses run on the CPU
(--placement run), and its 4-bit store the same tokens with and without CUDA graphs in bfloat16. Prints one line per family; exit 1 if any differs. (The CPU side of these
checks is tests/test_families.py.)

    python scripts/check_families_cuda.py [WORKDIR [FAMILY,...]]"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from common.model_config import FAMILY_NAMES
from coordinator.runtime.engine import Engine
from coordinator.tools.pack import pack_checkpoint
from coordinator.tools.tiny_model import make_tiny_model

PROMPT = list(range(3, 27))


def tokens(store: Path, **options) -> tuple[list[int], float]:
    with Engine.open(store, **options) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
        list(generation)
        return generation.token_ids, generation.stats.tokens_per_s


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    failed = False
    families = sys.argv[2].split(",") if len(sys.argv) > 2 else FAMILY_NAMES
    for family in families:
        started = time.perf_counter()
        model = make_tiny_model(work / family / "model", family=family)
        s16, s4 = work / family / "s16", work / family / "s4"
        pack_checkpoint(model_dir=model, out=s16, expert_bits=16, progress=False)
        pack_checkpoint(model_dir=model, out=s4, expert_bits=4, dense_bits=4, progress=False)
        cpu, _ = tokens(s16, device="cpu", dtype="float32", cache_experts=2)
        gpu, _ = tokens(s16, device="cuda", dtype="float32", cache_experts=2)
        ran, _ = tokens(s16, device="cuda", dtype="float32", cache_experts=2, placement="run")
        graphed, speed = tokens(s4, device="cuda", dtype="bfloat16", cache_experts=2)
        direct, _ = tokens(s4, device="cuda", dtype="bfloat16", cache_experts=2, cuda_graphs=False)
        same = cpu == gpu == ran and graphed == direct
        failed |= not same
        print(f"{family:12s} float32 cpu == cuda: {cpu == gpu}   == cuda with misses run on the cpu: {gpu == ran}   "
              f"4-bit bf16 graphs == direct: {graphed == direct}   {speed:.0f} tok/s   ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
