#!/usr/bin/env bash
# The CUDA backend's checks on a machine with an NVIDIA GPU, in one go (a few minutes):
# build libqes with the plugin and the C tests, compare every available backend (cuda
# included) with portable in test_native, then the Python backend tests on that build.
#   scripts/test_cuda.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== nvidia-smi"
GPU=0
if nvidia-smi; then GPU=1; else echo "(nvidia-smi failed: the cuda backend will report itself not available)"; fi

NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
CMAKE="$(command -v cmake || echo .venv/bin/cmake)"

echo "== build (build/cuda)"
time "$CMAKE" -S . -B build/cuda "${GEN[@]}" -DQES_BUILD_TESTS=ON -DQES_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" >/dev/null
time "$CMAKE" --build build/cuda

echo "== the plugin"
ls -la build/cuda/libqes_cuda.so
cat > build/cuda/avail.c <<'C'
#include <stdio.h>
#include "qes.h"
int main(void) {
    for (int b = 0; b < qes_backend_count(); ++b)
        printf("%-8s compiled %d available %d\n", qes_backend_name(b), qes_backend_compiled(b), qes_backend_available(b));
    return qes_backend_available(QES_BACKEND_CUDA) ? 0 : 3;
}
C
cc -o build/cuda/avail build/cuda/avail.c -Inative/include -Lbuild/cuda -lqes -Wl,-rpath,"$PWD/build/cuda"
if ! build/cuda/avail && [ "$GPU" = 1 ]; then
  echo "FAIL: a GPU is here but the cuda backend is not available (driver older than the CUDA runtime"
  echo "      $("$NVCC" --version | tail -1) needs?)"
  exit 1
fi

echo "== test_native (every available backend against portable; cuda included when available above)"
time build/cuda/test_native | grep -E "^backend |FAIL|passed"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: test_native"; exit 1; }

if [ -x .venv/bin/python ]; then
  echo "== tests/test_backends.py on build/cuda/libqes.so"
  time QES_EDGE_LIB="$PWD/build/cuda/libqes.so" .venv/bin/python -m pytest -q -x tests/test_backends.py
else
  echo "(no .venv: Python backend tests skipped)"
fi
