#!/usr/bin/env bash
# One GPU call for placement auto's weighed guesses (issue 9: 1.1x llama.cpp's -ncmoe 16 on random
# routing, 1.3x copy), llama.cpp in the same call. Carry .whl (the wheels the device image
# lacks: scripts/gpu_wheels.sh), .peer (scripts/peer_bench.sh prepare) and the generated
# common/rpc/*_pb2*.py (the install makes them; else python -m common.rpc.generate). In order:
#   the CPU expert kernel, its threads with one fixed share each (take 0) against 4 tiles at a
#     time (take 4), x as given against one and two int8 digits (x digits 0, 1, 2), on 1, 8 and 16 threads
#     (is it the cores or the memory?), on an idle host and with one core kept busy (as the GPU
#     loop's syncs do);
#   the synthetic Mixtral-8x7B store (2-bit experts) in /dev/shm, beside llama.cpp's GGUF;
#   llama-bench -ngl 99 -ncmoe 16 decode;
#   bench lru+prefetch, K = 4, placements copy and auto (its defaults: guesses weighed against the
#   balanced pace, x as two int8 digits where the CPU has VNNI); then auto with the guesses weighed
#   against the measured pace (MOE_EDGE_WEIGH_GUESSES=measured), x as one digit, 15 CPU threads, x as
#   given, while time is left (EXTRA_BENCHES first, then LINK); LINK=1 runs every expert on one expert host behind the link proxy
#   (scripts/placement_bench.sh: LINK_RATES ["1gbit 10gbit"; "direct": no proxy], LINK_COPY_RATES [10gbit],
#   LINK_PLACEMENTS [run,auto], LINK_TOKENS [32], LINK_VARIANTS ["link::14": name:VAR=value,...:host
#   threads[:HOST_CPUS/COORDINATOR_CPUS, e.g. 2-15/0-1], one run of it each]); PLACEMENTS=0 leaves out
#   the first bench (copy and auto on local RAM); EXTRA_BENCHES="name flags...;..." more
#   benches after the first, each with its own flags. CPU_BENCH=0 leaves out the CPU kernel's times; COLD=1 adds them as
#   the decode meets them (each expert cold, then the GPU copying meanwhile, then with THP, then
#   with 3 ms between calls, slept or spun); LLAMA=0
#   leaves out llama.cpp; PLACEMENTS_ENV sets the first bench's environment, VARIANTS the list
#   of auto's (name:VAR=value,VAR=value ...).
# Each step is skipped once fewer seconds are left of LIMIT (default 575) than it needs.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/moe-edge-out}; mkdir -p "$OUT"; LIMIT=${LIMIT:-575}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
S=/dev/shm/moe-edge-mixtral; t=$SECONDS
left() { (( SECONDS + $1 < LIMIT )) || { echo "-- skipped (time): $2"; return 1; }; }
bench() {  # a name, the environment it runs under ("" for none), then bench's flags
  local name=$1 vars=$2; shift 2
  env $vars timeout $(( LIMIT - SECONDS - 5 )) python3 -m coordinator bench --store $S --device cuda --cache-experts 4 "$@" \
    > "$OUT/$name.txt" 2> "$OUT/$name.err"; echo "[$name ($vars) rc $? at $SECONDS s]"; grep -v "^ *$" "$OUT/$name.txt" | sed -n 6,40p
  tail -2 "$OUT/$name.err"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
lscpu | grep -E "^(Model name|Thread|Core|Socket|NUMA node\(s\)|L2 cache|L3 cache)"
grep -o -w -E "avx512_bf16|avx512_vnni|amx_int8" /proc/cpuinfo | sort | uniq -c
cat /sys/kernel/mm/transparent_hugepage/enabled
if [[ ${COLD:-0} == 1 ]]; then  # the kernel as the decode runs it: each expert cold, the GPU copying meanwhile
  cold() {  # a title, the environment ("" for none), then the bench's flags; prints its rows
    local title=$1 vars=$2; shift 2
    env $vars timeout 100 python3 -m scripts.cpu_expert_bench --kernels native --bits 2 --tokens 1 --cold 40 "$@" \
      > "$OUT/cpu-cold.txt" 2>&1
    echo "-- cold, $title"; grep -v "^{" "$OUT/cpu-cold.txt" | sed -n '2,$p'
  }
  grid="--x-digits 0,1,2 --threads 8,15,16 --repeats 20"
  cold "no copies" "" $grid
  cold "the GPU copying" "" $grid --dma
  cold "the GPU copying, THP" THP_MEM_ALLOC_ENABLE=1 $grid --dma
  one="--x-digits 2 --threads 15 --repeats 30 --dma"  # runs come layers apart: have the kernel's threads gone idle?
  cold "the GPU copying, back to back" "" $one
  cold "the GPU copying, 3 ms slept between calls" "" $one --gap-ms 3
  cold "the GPU copying, 3 ms spun between calls, OMP_WAIT_POLICY=ACTIVE" OMP_WAIT_POLICY=ACTIVE $one --gap-ms 3 --gap-spin
fi
if [[ ${CPU_BENCH:-1} == 1 ]]; then
for busy in 0 1; do
  timeout 120 python3 -m scripts.cpu_expert_bench --kernels native --bits 2 --tokens 1,8 --takes 0,4 --x-digits 0,1,2 \
    --threads 1,8,16 --repeats 10 --busy-cores $busy > "$OUT/cpu-busy$busy.txt" 2>&1; grep -v "^{" "$OUT/cpu-busy$busy.txt" | tail -26
done
fi
[[ ${LLAMA:-1} == 1 ]] && bash scripts/peer_bench.sh build .peer
(python3 -m coordinator make-synthetic --shape mixtral-8x7b --expert-bits 2 --dense-bits 4 --out $S --quiet \
   > "$OUT/make-synthetic.txt" 2>&1; echo "make-synthetic $((SECONDS - t)) s" >> "$OUT/make-synthetic.txt") &
maker=$!
[[ ${LLAMA:-1} == 1 ]] && bash scripts/peer_bench.sh gguf mixtral Q2_K | tail -1
wait $maker; tail -1 "$OUT/make-synthetic.txt"
[[ ${LLAMA:-1} == 1 ]] && left 60 llama.cpp && { bash scripts/peer_bench.sh bench "-ngl 99 -ncmoe 16 -p 0 -n 64 -r 2" | grep tg64; rm -f /tmp/peer/*.gguf; }
[[ ${PLACEMENTS:-1} == 1 ]] && left 90 placements && bench placements "${PLACEMENTS_ENV:-}" --modes lru+prefetch --placements copy,auto --prompt-tokens 16 --tokens 32 \
  --profile-tokens 2
IFS=';' read -ra extra <<< "${EXTRA_BENCHES:-}"  # "name flags...;name flags...": more benches, each its own flags
for e in "${extra[@]}"; do
  e=${e# }; left 90 "${e%% *}" && bench "${e%% *}" "" ${e#* }
done
if [[ ${LINK:-0} == 1 ]]; then  # every expert on one host behind the link proxy, the cache starting empty
  for v in ${LINK_VARIANTS:-link::14}; do  # name:VAR=value,...:host threads
    IFS=: read -r name vars threads cpus <<< "$v"  # cpus: HOST/COORDINATOR lists (2-15/0-1), else shared
    left 100 "$name" || continue
    env ${vars//,/ } timeout $(( LIMIT - SECONDS - 5 )) bash scripts/placement_bench.sh --store $S --device cuda \
      --rates "${LINK_RATES:-1gbit 10gbit}" --copy-rates "${LINK_COPY_RATES:-10gbit}" --copy-tokens 1 --run-modes lru \
      --run-placements ${LINK_PLACEMENTS:-run,auto} --run-tokens ${LINK_TOKENS:-32} --host-threads ${threads:-14} \
      ${cpus:+--host-cpus ${cpus%/*} --coordinator-cpus ${cpus#*/}} --work /tmp/link > "$OUT/$name.txt" 2>&1
    echo "[$name ($vars, host threads ${threads:-14}) rc $? at $SECONDS s]"; tail -6 "$OUT/$name.txt" | head -5; rm -rf /tmp/link
  done
fi
for variant in ${VARIANTS:-measured-pace:MOE_EDGE_WEIGH_GUESSES=measured one-digit:MOE_EDGE_CPU_X_DIGITS=1 \
                 threads15:OMP_NUM_THREADS=15 x-as-given:MOE_EDGE_CPU_X_DIGITS=0}; do
  vars=${variant#*:}; left 60 "${variant%%:*}" && bench "${variant%%:*}" "${vars//,/ }" --modes lru+prefetch --placements auto --prompt-tokens 16 \
    --tokens 32 --profile-tokens 2
done
echo "== decode tok/s, each run"; grep -h -E "^lru\+prefetch" "$OUT"/*.txt | grep -v "^lru+prefetch/auto /" | awk 'NF > 8'
rm -rf $S
echo "end at $SECONDS s"
