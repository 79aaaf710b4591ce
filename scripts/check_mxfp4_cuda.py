"""On a CUDA machine: a GPT-OSS store whose experts are kept in MXFP4 (made from the tiny random
model as tests/test_mxfp4.py makes it) gives the CPU's greedy tokens on the GPU (float32, through
CUDA graphs), both with the fused MXFP4 kernels (kernels/mxfp4_linear.py, the default since this
passed on an H200) and with the experts dequantized before a plain matmul (fused_kernels=False).
One line each; exit 1 if either differs.

    python scripts/check_mxfp4_cuda.py [WORKDIR]"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_mxfp4 import write_checkpoints  # noqa: E402  (the test's own MXFP4 checkpoint maker)

from coordinator.runtime.engine import Engine  # noqa: E402
from coordinator.tools.pack import pack_checkpoint  # noqa: E402


def tokens(store: Path, **options) -> list[int]:
    with Engine.open(store, **options) as engine:
        generation = engine.generate(list(range(3, 27)), max_new_tokens=16, stop_at_eos=False)
        list(generation)
        return generation.token_ids


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    mxfp4, _ = write_checkpoints(work)
    store = work / "store"
    pack_checkpoint(model_dir=mxfp4, out=store, progress=False)
    cpu = tokens(store, device="cpu", dtype="float32", cache_experts=2)
    same = True
    for fused in (True, False):
        gpu = tokens(store, device="cuda", dtype="float32", cache_experts=2, fused_kernels=fused)
        how = "fused MXFP4 kernels" if fused else "dequantize + matmul"
        print(f"gpt_oss MXFP4 store: float32 cpu == cuda (graphs, {how}): {cpu == gpu}", flush=True)
        same &= cpu == gpu
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
