#!/usr/bin/env bash
# llama.cpp beside moe-edge's bench, same shapes, same GPU session (issue 11: the peer in the bench).
#
# Here, where the package index is reachable (no GPU needed):
#   scripts/peer_bench.sh prepare [DIR]     llama.cpp's source (as the llama-cpp-python sdist ships
#                                           it), stripped to ~8 MB, two vocab GGUFs, the gguf wheel:
#                                           into DIR (default .peer/, git-ignored); carry DIR.
# On the GPU machine (no network), from the repository root, DIR carried:
#   scripts/peer_bench.sh build [DIR]       starts a static CUDA build of llama-bench in the background
#                                           (3.5 min on 16 cores), unless DIR/bin/llama-bench is there
#                                           already (the xz'd pieces of a binary an earlier call brought
#                                           back in $OUT/peer-bin: copy them to DIR/bin, carry, no build)
#   scripts/peer_bench.sh gguf ARCH QTYPE   writes a random-weight GGUF of the real shapes (mixtral =
#                                           Mixtral-8x7B, qwen3moe = Qwen3-30B-A3B; Q2_K or Q4_K experts,
#                                           attention Q4_K, output Q6_K) into $TMPDIR/peer
#   scripts/peer_bench.sh bench "ARGS"...   waits for the build, runs llama-bench -t 16 once per ARGS on
#                                           every GGUF written; lines go to $OUT/llama-bench.txt
# The machine keeps its temp folder only while warm: build, gguf and bench in one call (or back to back).
# llama.cpp's code is downloaded and built for the benchmark, never copied into this project.
set -uo pipefail
LLAMA_CPP_PYTHON=0.3.36  # the sdist whose vendor/ folder is the llama.cpp we compare against
GGUF_PY=0.19.0
here=$(cd "$(dirname "$0")" && pwd)
T=${TMPDIR:-/tmp}; W=$T/peer; OUT=${OUT:-$T/out}; mkdir -p "$W" "$OUT"
step=${1:-}; shift || true
case $step in
prepare)
  set -e
  dir=${1:-.peer}; mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
  pip download -q --no-deps "gguf==$GGUF_PY" -d "$dir"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
  mkdir -p "$tmp/models"; cp "$src"/models/ggml-vocab-{llama-spm,qwen2}.gguf "$tmp/models/"
  rm -rf "$src"/{models,docs,media,benches,.git,.github} "$src/tools/server/public" "$src/tools/ui" 2>/dev/null || true
  tar cJf "$dir/llamacpp-src.tar.xz" -C "$(dirname "$src")" llama.cpp
  tar cJf "$dir/vocab.tar.xz" -C "$tmp" models
  du -sh "$dir" ;;
build)
  dir=$(cd "${1:-.peer}" && pwd)
  tar xf "$dir/vocab.tar.xz" -C "$W"
  python3 -m pip install -q --no-deps --target "$T/peer-site" "$dir"/gguf-*.whl
  if ls "$dir"/bin/llama-bench.xz.* >/dev/null 2>&1; then  # a binary an earlier call brought back
    mkdir -p "$W/bin"; cat "$dir"/bin/llama-bench.xz.* | xz -dc > "$W/bin/llama-bench"; chmod +x "$W/bin/llama-bench"
    if "$W/bin/llama-bench" --help >/dev/null 2>&1; then touch "$W/build.done"; echo "llama-bench: carried binary"; exit 0; fi
    echo "llama-bench: the carried binary does not run here; building"
  fi
  tar xf "$dir/llamacpp-src.tar.xz" -C "$W"
  cd "$W/llama.cpp" && cmake -S . -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF \
     -DGGML_CUDA_NCCL=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$OUT/peer-cmake.log" 2>&1 || { tail -20 "$OUT/peer-cmake.log"; exit 1; }
  # The static binary comes back stripped and xz'd in 15 MB pieces (what $OUT returns): put them in DIR/bin to skip this build.
  (setsid nohup bash -c "cmake --build build -j16 --target llama-bench > $W/build.log 2>&1; mkdir -p $W/bin $OUT/peer-bin; \
     cp build/bin/llama-bench $W/bin/ && strip -o $W/llama-bench.stripped build/bin/llama-bench && \
     xz -T0 -6 -c $W/llama-bench.stripped | split -b 15M -d - $OUT/peer-bin/llama-bench.xz.; touch $W/build.done" >/dev/null 2>&1 &)
  echo "llama-bench: building in the background ($W/build.log)" ;;
gguf)
  arch=${1:-mixtral}; q=${2:-Q2_K}
  vocab=$W/models/ggml-vocab-llama-spm.gguf; [[ $arch == qwen3moe ]] && vocab=$W/models/ggml-vocab-qwen2.gguf
  PYTHONPATH=$T/peer-site python3 "$here/peer_gguf.py" "$arch" "$W/$arch-$q.gguf" --qtype "$q" --vocab "$vocab" ;;
bench)
  for _ in $(seq 120); do [[ -f $W/build.done ]] && break; sleep 5; done
  B=$W/bin/llama-bench; [[ -x $B ]] || { echo "no llama-bench"; tail -5 "$W/build.log"; exit 1; }
  for m in "$W"/*.gguf; do for args in "$@"; do
    echo "== $(basename "$m") $args"; timeout 400 $B -m "$m" $args -t 16 2>&1 | grep -E "^\||error" | tee -a "$OUT/llama-bench.txt"
  done; done ;;
*) sed -n 2,20p "$0"; exit 2 ;;
esac
