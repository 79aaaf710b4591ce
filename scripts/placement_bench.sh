#!/usr/bin/env bash
# Placement over a shaped link, on one machine: an expert host holding a store's experts, a
# link proxy in front of it at each rate (1, 2.5 and 10 GbE by default, 0.3 ms round trip), and
# `bench --hosts PROXY` through it: copy (every miss fetched over the link: seconds per token at
# 1 GbE, so few tokens) and run/auto (misses run on the host, only hidden states cross), one
# table at the end. The host, the proxy and the coordinator share this machine's cores, which a
# real LAN would not: the table says so. Everything started here is stopped on exit (trap).
#
#   scripts/placement_bench.sh --device cuda                     # make-synthetic mixtral-8x7b, then bench
#   scripts/placement_bench.sh --store STORE --device cuda --rates "1gbit 10gbit"
#   scripts/placement_bench.sh --shape small --device cpu        # a quick end-to-end check on CPU
#
# Options: --store STORE (else --shape SHAPE [mixtral-8x7b] is made under --work, cut to its first
# --layers N when given: faster, and the figures are then per N layers), --work DIR, --device,
# --rates "R ..." (`direct`: no proxy, the host's own loopback), --rtt-ms MS, --copy-tokens N [2],
# --copy-rates "R ..." [every rate: copy runs at seconds per token on a slow link], --run-tokens N
# [16], --cache-experts K, --host-threads N [all cores: on one machine the host's OpenMP threads
# then contend with the coordinator and the proxy], --run-placements "P,..." [run,auto],
# --run-modes "M,..." [lru: with prefetch on, prefetched experts still cross the link as copies,
# at 1 GbE seconds per token], --host-cpus LIST / --coordinator-cpus LIST (e.g. 2-15 / 0,1: the
# host, and the coordinator with the proxy, each kept to its own cores, so that the host's OpenMP
# threads never take a core a hand-off waits for); anything after `--` goes to every bench call.
# JSON per run lands in --work.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
STORE="" SHAPE=mixtral-8x7b WORK="" DEVICE=cuda RATES="1gbit 2.5gbit 10gbit" RTT_MS=0.3
COPY_TOKENS=2 COPY_RATES="" RUN_PLACEMENTS=run,auto RUN_TOKENS=16 HOST_THREADS="" CACHE_EXPERTS=4 RUN_MODES=lru LAYERS="" HOST_CPUS="" COORDINATOR_CPUS="" EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --store) STORE=$2; shift 2 ;;
        --shape) SHAPE=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --rates) RATES=$2; shift 2 ;;
        --rtt-ms) RTT_MS=$2; shift 2 ;;
        --copy-tokens) COPY_TOKENS=$2; shift 2 ;;
        --copy-rates) COPY_RATES=$2; shift 2 ;;
        --host-threads) HOST_THREADS=$2; shift 2 ;;
        --run-tokens) RUN_TOKENS=$2; shift 2 ;;
        --cache-experts) CACHE_EXPERTS=$2; shift 2 ;;
        --run-modes) RUN_MODES=$2; shift 2 ;;
        --run-placements) RUN_PLACEMENTS=$2; shift 2 ;;
        --layers) LAYERS=$2; shift 2 ;;
        --host-cpus) HOST_CPUS=$2; shift 2 ;;
        --coordinator-cpus) COORDINATOR_CPUS=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "placement_bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
WORK=${WORK:-$(mktemp -d /tmp/placement-bench.XXXXXX)}
mkdir -p "$WORK"
cd "$ROOT"

on_cpus() {  # on_cpus LIST COMMAND...: exec COMMAND kept to the CPUs of LIST ("" for all); run it in a
    local cpus=$1; shift  # subshell (`&` or parentheses), whose process id COMMAND then keeps
    [ -z "$cpus" ] && exec "$@"
    exec "$PYTHON" -c 'import os, sys
cpus = {c for part in sys.argv[1].split(",") for a, _, b in [part.partition("-")] for c in range(int(a), int(b or a) + 1)}
os.sched_setaffinity(0, cpus)
os.execvp(sys.argv[2], sys.argv[2:])' "$cpus" "$@"
}

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$STORE" ]; then
    STORE=$WORK/store-$SHAPE${LAYERS:+-$LAYERS-layers}
    [ -f "$STORE/manifest.json" ] || "$PYTHON" -m coordinator make-synthetic --shape "$SHAPE" --out "$STORE" --quiet \
        ${LAYERS:+--layers "$LAYERS"}
fi

echo "== expert host on $STORE (log: $WORK/host.log)"
rm -f "$WORK/host.addr"
on_cpus "$HOST_CPUS" "$PYTHON" -m expert_host serve --store "$STORE" ${HOST_THREADS:+--threads "$HOST_THREADS"} --listen 127.0.0.1:0 --address-file "$WORK/host.addr" \
    --log-level warning >"$WORK/host.log" 2>&1 &
PIDS+=($!)
HOST_PID=$!
until [ -s "$WORK/host.addr" ]; do
    kill -0 "$HOST_PID" 2>/dev/null || { echo "the expert host exited:" >&2; cat "$WORK/host.log" >&2; exit 1; }
    sleep 0.5
done
HOST=$(cat "$WORK/host.addr")
echo "   serving on $HOST"

bench() {  # bench OUT.json ARGS...: one bench through the current proxy
    local out=$1; shift
    (on_cpus "$COORDINATOR_CPUS" "$PYTHON" -m coordinator bench --store "$STORE" --device "$DEVICE" --hosts "$PROXY" \
        --cache-experts "$CACHE_EXPERTS" --prompt-tokens 1 --json "$@" "${EXTRA[@]}") >"$out"
}

for rate in $RATES; do
    if [ "$rate" = direct ]; then  # no proxy: the host's own loopback, what the link adds is the rest
        PROXY=$HOST PROXY_PID=""
        echo "== direct: no link proxy, $HOST"
    else
        on_cpus "$COORDINATOR_CPUS" "$PYTHON" -m expert_host link-proxy --to "$HOST" --rate "$rate" --rtt-ms "$RTT_MS" >"$WORK/proxy-$rate.log" 2>&1 &
        PROXY_PID=$!
        PIDS+=($PROXY_PID)
        until grep -q "^link-proxy on " "$WORK/proxy-$rate.log"; do
            kill -0 "$PROXY_PID" 2>/dev/null || { cat "$WORK/proxy-$rate.log" >&2; exit 1; }
            sleep 0.2
        done
        PROXY=$(sed -n 's/^link-proxy on \([^ ]*\) .*/\1/p' "$WORK/proxy-$rate.log")
        echo "== $rate, ${RTT_MS} ms round trip: link proxy $PROXY -> $HOST"
    fi
    if [ -z "$COPY_RATES" ] || [[ " $COPY_RATES " == *" $rate "* ]]; then
        echo "   copy: $COPY_TOKENS tokens"
        bench "$WORK/$rate-copy.json" --modes lru+prefetch --placements copy --tokens "$COPY_TOKENS" \
            --warmup-tokens 0 --profile-tokens 1
    fi
    echo "   $RUN_PLACEMENTS ($RUN_MODES): $RUN_TOKENS tokens"
    bench "$WORK/$rate-run.json" --modes "$RUN_MODES" --placements "$RUN_PLACEMENTS" --tokens "$RUN_TOKENS" \
        --warmup-tokens 2 --profile-tokens 2
    [ -z "$PROXY_PID" ] || { kill "$PROXY_PID" && wait "$PROXY_PID" 2>/dev/null || true; }
done

"$PYTHON" - "$WORK" "$RTT_MS" $RATES <<'EOF'
import json, os, sys
from pathlib import Path

work, rtt, rates = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print()
first = None
rows = []
for rate in rates:
    for part in ("copy", "run"):
        if not (work / f"{rate}-{part}.json").exists():  # copy left out at this rate (--copy-rates)
            continue
        report = json.loads((work / f"{rate}-{part}.json").read_text())
        first = first or report
        for r in report["results"]:
            if r.get("skipped"):
                rows.append(f"{rate:>8} {r['mode'] + '/' + r['placement']:<18} skipped: {r['skipped']}")
                continue
            links = r["bytes_per_token_by_link"].values()
            to_us = sum(l["fetched"] + l.get("run_received", 0) for l in links)
            to_host = sum(l.get("run_sent", 0) for l in links)
            rows.append(f"{rate:>8} {r['mode'] + '/' + r['placement']:<18} {r['decode_tokens_per_s']:>8.2f} "
                        f"{r['hits_per_token']:>6.1f} {r['misses_per_token']:>6.1f} {r['runs_elsewhere_per_token']:>6.1f} "
                        f"{to_us / 1e6:>9.2f} {to_host / 1e3:>9.1f} {r['copy_wait_ms_per_token']:>9.1f} "
                        f"{r['run_wait_ms_per_token']:>9.1f} {r['host_run_ms_per_token']:>9.1f} "
                        f"{r.get('host_compute_ms_per_token', 0):>9.1f}")
print(f"placement over a shaped link: {first['store']} on {first['device']} ({first['dtype']}), "
      f"{first['layers']} layers x {first['experts']} experts of {first['expert_mb']:.1f} MB, K = {first['cache_experts']}, "
      f"round trip {rtt} ms")
print(f"  NOTE: the expert host, the link proxy and the coordinator share this machine's {os.cpu_count()} cores; "
      "on a real LAN the host's CPU would be its own")
print(f"  routing comes from {first['routing']}")
print(f"{'link':>8} {'mode/placement':<18} {'tok/s':>8} {'hit':>6} {'copied':>6} {'run on':>6} "
      f"{'to us':>9} {'to host':>9} {'copy':>9} {'run':>9} {'host':>9} {'host':>9}")
print(f"{'':>8} {'':<18} {'':>8} {'/token':>6} {'/token':>6} {'host':>6} {'MB/token':>9} {'KB/token':>9} "
      f"{'wait ms':>9} {'wait ms':>9} {'call ms':>9} {'cpu ms':>9}")
print("\n".join(rows))
print(f"(JSON of each run in {work})")
EOF
