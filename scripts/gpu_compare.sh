#!/usr/bin/env bash
# One call on a lent GPU machine: bench the same synthetic Mixtral-8x7B store with an earlier
# checkout of the code (BEFORE, a folder holding its coordinator/ and common/) and with this
# one, alternating, so that a refactor's speed can be judged against the run-to-run noise.
#   usage: scripts/gpu_compare.sh BEFORE_DIR [rounds] [bench-args...]
set -uo pipefail
OUT=${OUT:-/tmp/moe-edge-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BEFORE=$(cd "$1" && pwd); ROUNDS=${2:-2}; shift 2 || shift $#
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
AFTER=$PWD
S=/tmp/moe-edge-synthetic
if [[ ! -f $S/manifest.json ]]; then
  started=$SECONDS
  PYTHONPATH=/tmp/site:$AFTER python3 -m coordinator make-synthetic --shape mixtral-8x7b --expert-bits 2 --dense-bits 4 --out $S --quiet 2>&1 | tee "$OUT/synthetic.log" || exit 1
  echo "make-synthetic took $((SECONDS - started)) s" | tee -a "$OUT/synthetic.log"
fi
for round in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    dir=$([[ $side == before ]] && echo "$BEFORE" || echo "$AFTER")
    started=$SECONDS
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir python3 -m coordinator bench --store $S --device cuda --cache-experts 4 --json "$@" \
      > "$OUT/bench-$side-$round.json" 2> "$OUT/bench-$side-$round.err")
    echo "$side round $round: exit $? in $((SECONDS - started)) s"
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*.json"))):
    try:
        report = json.load(open(path))
    except ValueError:
        print(path, "no report"); continue
    name = os.path.basename(path)[6:-5]
    print(f"{name:10s} " + "  ".join(f"{r['mode']} {r['decode_tokens_per_s']:.2f} (hit {r['hit_rate']:.2f}, copied {r['experts_copied_per_token']:.1f})"
                                   for r in report["results"] if not r.get("skipped")))
PY
