#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): install the carried wheels (.whl/: hqq and
# termcolor, which that image lacks; grpcio 1.85 to match the generated code, which the call
# carries too), run the CUDA tests, check the CLI on the tiny model (CPU vs CUDA, in-process vs
# a local expert host), measure gRPC fetch against a raw socket copy, then make the synthetic
# Mixtral-8x7B store and benchmark it. Logs go to $OUT.
#   usage: scripts/gpu_session.sh [tests,cli,fetch,bench,placement,localhost,link] [bench-args...]
#   (default: tests,cli,fetch,bench; placement, localhost and link are issue 9's placement runs)
set -uo pipefail
OUT=${OUT:-/tmp/moe-edge-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
steps=${1:-tests,cli,fetch,bench}
shift || true
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, transformers, google.protobuf, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "protobuf", google.protobuf.__version__)
print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
PY
date -u | tee -a "$OUT/env.txt"

if [[ $steps == *tests* ]]; then
  python3 -m pytest -q -p no:cacheprovider -o asyncio_mode=strict tests/test_kernels.py tests/test_cuda_engine.py \
    tests/test_matches_transformers.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi

if [[ $steps == *cli* ]]; then
  T=$(mktemp -d)
  {
    python3 -m coordinator make-tiny-model "$T/model"
    python3 -m coordinator pack --model "$T/model" --out "$T/s16" --expert-bits 16 --quiet
    python3 -m coordinator pack --model "$T/model" --out "$T/s4" --expert-bits 4 --dense-bits 4 --quiet
    for dev in cpu cuda; do
      echo "== s16 float32 $dev"
      python3 -m coordinator generate --store "$T/s16" --prompt "Hello world" --max-new-tokens 24 --greedy \
        --device $dev --dtype float32 --cache-experts 2 --json | tail -1 | python3 -c "import json,sys; r=json.load(sys.stdin); print(r['token_ids'])"
    done
    for dt in float16 bfloat16; do
      echo "== s4 $dt cuda"
      python3 -m coordinator generate --store "$T/s4" --prompt "Hello world" --max-new-tokens 24 --greedy \
        --device cuda --dtype $dt --cache-experts 2 --json | tail -1 | python3 -c "import json,sys; r=json.load(sys.stdin); print(r['token_ids'], round(r['stats']['tokens_per_s'],1), 'tok/s')"
    done
    echo "== s4 bfloat16 cuda, experts from a local expert host over gRPC"
    python3 -m coordinator generate --store "$T/s4" --prompt "Hello world" --max-new-tokens 24 --greedy \
      --device cuda --dtype bfloat16 --cache-experts 2 --local-host --json | tail -1 | python3 -c "import json,sys; r=json.load(sys.stdin); print(r['token_ids'], round(r['stats']['tokens_per_s'],1), 'tok/s', r['stats']['bytes_by_source'])"
  } 2>&1 | tee "$OUT/cli.log"
fi

if [[ $steps == *fetch* ]]; then
  F=$(mktemp -d)
  python3 -c "from coordinator.tools.tiny_model import make_tiny_model; make_tiny_model('$F/model', hidden_size=1024, intermediate_size=4096, num_layers=2, num_heads=8, num_kv_heads=2)" >/dev/null 2>&1
  python3 -m coordinator pack --model "$F/model" --out "$F/store16" --expert-bits 16 --quiet
  python3 -m coordinator bench-fetch --store "$F/store16" --seconds 4 --streams 4 2>&1 | tee "$OUT/fetch.txt"
  python3 -m coordinator bench-fetch --store "$F/store16" --seconds 4 --streams 8 2>&1 | tee -a "$OUT/fetch.txt"
fi

S=/tmp/moe-edge-synthetic
synthetic_store() {
  if [[ ! -f $S/manifest.json ]]; then
    started=$SECONDS
    python3 -m coordinator make-synthetic --shape mixtral-8x7b --expert-bits 2 --dense-bits 4 --out $S --quiet 2>&1 | tee "$OUT/synthetic.log"
    echo "make-synthetic took $((SECONDS - started)) s" | tee -a "$OUT/synthetic.log"
  fi
}

bench() {  # bench NAME ARGS...: one bench on the synthetic store, its JSON and table in $OUT
  local name=$1; shift
  python3 -m coordinator bench --store $S --device cuda --cache-experts 4 --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  tail -5 "$OUT/$name.err"
  python3 - "$OUT/$name.json" <<'PY' | tee "$OUT/$name.txt"
import json, sys
from coordinator.bench.decode import BenchReport, ModeResult
from coordinator.bench.report import render
data = json.load(open(sys.argv[1]))
data.pop("copy_bound_tokens_per_s", None)
data["results"] = [ModeResult(**r) for r in data["results"]]
print(render(BenchReport(**data)))
PY
}

if [[ $steps == *bench* ]]; then
  synthetic_store
  bench bench "$@"
fi

# Placement (issue 9): experts in local RAM run on this CPU, side by side with copying them; the
# local expert host (its experts in shared memory) against in-process RAM; a host behind a
# shaped link at 1, 2.5 and 10 GbE (scripts/placement_bench.sh).
if [[ $steps == *placement* ]]; then
  synthetic_store
  bench placement --modes lru,lru+prefetch --placements copy,run,auto "$@"
fi
if [[ $steps == *localhost* ]]; then
  synthetic_store
  bench localhost --modes lru+prefetch,resident --local-host "$@"
fi
if [[ $steps == *link* ]]; then
  # Over 1 GbE, copying the whole model's experts runs at seconds per token: without the full
  # store at hand, the first 8 layers of the shape (figures per 8 layers), to fit one call.
  if [[ -f $S/manifest.json ]]; then store=(--store $S); else store=(--shape mixtral-8x7b --layers 8); fi
  scripts/placement_bench.sh "${store[@]}" --device cuda --work /tmp/placement-link "$@" 2>&1 | tee "$OUT/link.txt"
fi
