#!/usr/bin/env bash
# On the lent GPU, in two calls back to back (the machine keeps /tmp only while warm):
#   scripts/gpu_families.sh prepare   start llama.cpp's build and write a Qwen3-30B-A3B Q4_K GGUF
#                                     (../shared/peers, carried as .peer/), check every family on
#                                     CUDA, write the synthetic qwen3-30b-a3b store (4-bit experts)
#   scripts/gpu_families.sh bench     bench that store (eager: see BENCHMARKS.md) and llama-bench
#                                     on the same shapes
set -uo pipefail
OUT=${OUT:-/tmp/moe-edge-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
S=/tmp/moe-edge-qwen3
case ${1:-} in
prepare)
  (bash .peer/device.sh build qwen3moe Q4_K > "$OUT/peer-build.log" 2>&1; echo "gguf written" >> "$OUT/peer-build.log") &
  python3 scripts/check_families_cuda.py /tmp/families 2>&1 | grep -v Warning | tee "$OUT/families-cuda.txt"
  started=$SECONDS
  python3 -m coordinator make-synthetic --shape qwen3-30b-a3b --expert-bits 4 --dense-bits 4 --out $S --quiet 2>&1 | tee "$OUT/synthetic.log"
  echo "make-synthetic took $((SECONDS - started)) s" | tee -a "$OUT/synthetic.log"
  wait; tail -3 "$OUT/peer-build.log" ;;
bench)
  python3 -m coordinator bench --store $S --device cuda --cache-experts 32 --no-cuda-graphs --tokens 16 --warmup-tokens 2 \
    --profile-tokens 2 --prompt-tokens 16 "${@:2}" --json > "$OUT/bench-qwen3.json" 2> "$OUT/bench-qwen3.err"
  echo "bench exit $?"; tail -2 "$OUT/bench-qwen3.err"
  python3 - "$OUT/bench-qwen3.json" <<'PY' | tee "$OUT/bench-qwen3.txt"
import json, sys
from coordinator.bench.decode import BenchReport, ModeResult
from coordinator.bench.report import render
data = json.load(open(sys.argv[1])); data.pop("copy_bound_tokens_per_s", None)
data["results"] = [ModeResult(**r) for r in data["results"]]
print(render(BenchReport(**data)))
PY
  bash .peer/device.sh bench "-ngl 99 -ot exps=CPU -p 512 -n 64 -r 1" "-ngl 99 -p 512 -n 64 -r 1" ;;
*) sed -n 2,8p "$0"; exit 2 ;;
esac
