#!/usr/bin/env bash
# Gather here what scripts/test_gpu.sh needs on a GPU machine that has Python, nvcc and CMake but
# no package registry, inside the 64 MiB that travels with the working tree:
#   .cache/gpu-bundle/wheels/   the Python packages for that machine's Python (3.12 by default)
#   .cache/gpu-bundle/llama_cpp_python-<v>-trimmed.tar.gz
#                               llama-cpp-python's source without what a CUDA build never reads
#                               (llama.cpp's vocab files, docs, tests, the other GPU backends):
#                               77 MB -> 5 MB
#
#   bash scripts/gpu_bundle.sh [python-version]      # then: run with carry .cache/gpu-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
V=0.3.36
OUT=.cache/gpu-bundle
PIP=(.venv/bin/python -m pip)
mkdir -p "$OUT"
tag=cp${PYV/./}
rm -rf "$OUT/wheels"
"${PIP[@]}" download -q --only-binary=:all: --python-version "$PYV" --implementation cp --abi "$tag" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d "$OUT/wheels" "numpy>=1.24" "cffi>=1.15" "gguf>=0.10" "typer>=0.12,<0.29" "rich>=13" "sqlite-utils>=4.0" \
  "pyserial>=3.5" "platformdirs>=4" "jinja2>=3.1" "psutil>=5.9" diskcache typing-extensions pytest hypothesis \
  "scikit-build-core>=0.10" setuptools wheel
"${PIP[@]}" download -q --no-deps --no-binary :all: -d "$OUT/wheels" afinn   # an sdist only (pure Python)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"${PIP[@]}" download -q --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$V"
tar xzf "$src/llama_cpp_python-$V.tar.gz" -C "$src"
d="$src/llama_cpp_python-$V"
rm -rf "$d/.git" "$d/examples" "$d/docs" "$d/tests"
l="$d/vendor/llama.cpp"
rm -rf "$l"/{models,docs,tests,benches,media,.github,examples,pocs,conversion,gguf-py,scripts,app,.devops}
find "$l/tools" -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
find "$l/ggml/src" -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu ! -name ggml-cuda -exec rm -rf {} +
tar czf "$OUT/llama_cpp_python-$V-trimmed.tar.gz" -C "$src" "llama_cpp_python-$V"
du -sh "$OUT" "$OUT"/*
