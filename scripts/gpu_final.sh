#!/usr/bin/env bash
# One short call on the lent GPU: the synthetic Qwen3-30B-A3B store benched with CUDA graphs (the
# staged expert path: 48 layers x 32 slots x top-8 is past MAX_EXPERT_GRAPHS), then the MXFP4
# GPT-OSS store on CUDA. Logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/moe-edge-out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
S=/tmp/moe-edge-qwen3
python3 -m coordinator make-synthetic --shape qwen3-30b-a3b --expert-bits 4 --dense-bits 4 --out $S --quiet 2>&1 | tail -1
python3 -m coordinator bench --store $S --device cuda --cache-experts 32 --modes lru+prefetch,resident --tokens 16 \
  --warmup-tokens 2 --profile-tokens 2 --prompt-tokens 16 2>&1 | tee "$OUT/bench-qwen3-graphs.txt" | tail -16
timeout 60 python3 scripts/check_mxfp4_cuda.py /tmp/mx 2>&1 | grep -v -i "warn\|writing" | tail -3
