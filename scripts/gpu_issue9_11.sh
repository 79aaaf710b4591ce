#!/usr/bin/env bash
# The GPU session behind BENCHMARKS.md's "Offloading against llama.cpp on the H200" section, as
# run on the lent H200 on 2026-12-01 (two calls there; here as the two steps, with
# scripts/peer_bench.sh's llama.cpp beside them). Carry .whl (the wheels the image lacks),
# .peer (scripts/peer_bench.sh prepare) and the generated common/rpc/*_pb2*.py.
#   scripts/gpu_issue9_11.sh peer     llama.cpp: build, Mixtral-8x7B Q2_K GGUF, llama-bench -ncmoe 16 and all-GPU
#   scripts/gpu_issue9_11.sh ours     the synthetic Mixtral-8x7B store (2-bit experts) in /dev/shm, the CUDA
#                                     checks of the resident one-graph decode, then bench: the four modes at a
#                                     512-token prompt, the routing trace replayed, placements copy/run/auto,
#                                     the CPU expert kernels, --local-host; each step skipped past LIMIT s
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/moe-edge-out}; mkdir -p "$OUT"; LIMIT=${LIMIT:-480}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
S=/dev/shm/moe-edge-mixtral; TRACE=scripts/traces/mixtral-tiny-stdlib.trace.jsonl
left() { (( SECONDS + $1 < LIMIT )) || { echo "-- skipped (time): $2"; return 1; }; }
bench() {
  local name=$1; shift
  timeout $(( LIMIT - SECONDS - 5 )) python3 -m coordinator bench --store $S --device cuda --cache-experts 4 "$@" \
    > "$OUT/$name.txt" 2> "$OUT/$name.err"; echo "[$name rc $?]"; cat "$OUT/$name.txt"; tail -3 "$OUT/$name.err"
}
case ${1:-} in
peer)
  bash scripts/peer_bench.sh build .peer
  bash scripts/peer_bench.sh gguf mixtral Q2_K
  bash scripts/peer_bench.sh bench "-ngl 99 -ncmoe 16 -p 512 -n 64 -r 2" "-ngl 99 -p 512 -n 64 -r 2" ;;
ours)
  t=$SECONDS; python3 -m coordinator make-synthetic --shape mixtral-8x7b --expert-bits 2 --dense-bits 4 --out $S --quiet 2>&1 | tail -1
  echo "make-synthetic $((SECONDS - t)) s"
  left 60 cuda-tests && timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_resident_decode.py \
    tests/test_routing_trace.py -k "cuda or resident" 2>&1 | tail -2
  left 100 modes && bench modes --prompt-tokens 512 --tokens 32 --profile-tokens 4
  left 70 trace && bench trace --routing $TRACE --modes naive,lru,lru+prefetch --tokens 32 --profile-tokens 2
  left 90 placement && bench placement --modes lru+prefetch --placements copy,run,auto --prompt-tokens 16 --tokens 16 --profile-tokens 2
  left 30 cpu && timeout 40 python3 -m scripts.cpu_expert_bench --repeats 10 --tokens 1 2>&1 | tail -8
  left 70 localhost && bench localhost --local-host --modes lru+prefetch --placements copy --prompt-tokens 16 --tokens 16 --profile-tokens 2
  rm -rf $S ;;
*) sed -n 2,11p "$0"; exit 2 ;;
esac
