#!/usr/bin/env bash
# The wheels a lent GPU machine's image lacks, for Python 3.12 on x86_64, into DIR (default .whl/,
# git-ignored): carry DIR, and the gpu_*.sh scripts install them with pip --no-index --target.
# The image has torch, transformers, safetensors and psutil; it lacks hqq (pure Python, and its
# termcolor), the grpcio this project's generated code wants, grpcio-health-checking, and pydantic
# (the serve command's). Run here, where the package index is reachable:
#   scripts/gpu_wheels.sh [DIR]
set -euo pipefail
dir=${1:-.whl}; mkdir -p "$dir"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# the versions this project was last tested with here (the generated gRPC code wants a protobuf
# runtime no older than the grpcio-tools that made it)
get() { pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp" "$@"; }
get termcolor==3.3.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 protobuf==7.36.2 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0
pip wheel -q --no-deps -w "$tmp" hqq==0.2.8.post1  # an sdist only; pure Python
cp "$tmp"/*.whl "$dir"/
ls "$dir"; du -sh "$dir"
