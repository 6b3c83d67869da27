#!/usr/bin/env bash
# Which llama.cpp build scripts/install.sh makes here: prints one line, "cpu" or "cuda ARCH"
# (ARCH: the GPU's compute capability without the dot, 90 for an H100, 87 for a Jetson Orin),
# and why on stderr.  QES_EDGE_GPU chooses: auto (default: CUDA where nvcc and an NVIDIA GPU are
# both present), cuda (required: fails where nvcc or the GPU's architecture cannot be found;
# QES_EDGE_CUDA_ARCH=87 names it by hand), cpu (never CUDA).
#
#   bash scripts/gpu_choice.sh            -> cpu | cuda 90
set -euo pipefail

want=${QES_EDGE_GPU:-auto}
case "$want" in auto|cuda|cpu) ;; *)
  echo "error: QES_EDGE_GPU=$want: choose auto, cuda or cpu" >&2; exit 2 ;;
esac
if [ "$want" = cpu ]; then
  echo "QES_EDGE_GPU=cpu: the CPU build" >&2; echo cpu; exit 0
fi

nvcc_path() {
  command -v nvcc 2>/dev/null && return 0
  local d=${CUDA_HOME:-/usr/local/cuda}/bin
  [ -x "$d/nvcc" ] && { echo "$d/nvcc"; return 0; }
  return 1
}

# the GPU's architecture: nvidia-smi's compute capability (desktop and data-centre cards), or a
# Jetson's from its device tree (tegra234: Orin, sm_87; tegra194: Xavier, sm_72; tegra210: Nano, sm_53)
gpu_arch() {
  if [ -n "${QES_EDGE_CUDA_ARCH:-}" ]; then echo "$QES_EDGE_CUDA_ARCH"; return 0; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .\r') || true
    if [[ "$cap" =~ ^[0-9]{2,3}$ ]]; then echo "$cap"; return 0; fi
  fi
  local dt=${QES_EDGE_DEVICE_TREE:-/proc/device-tree/compatible}
  if [ -r "$dt" ]; then
    case "$(tr '\0' ' ' < "$dt")" in
      *tegra234*) echo 87; return 0 ;;
      *tegra194*) echo 72; return 0 ;;
      *tegra210*) echo 53; return 0 ;;
    esac
  fi
  return 1
}

if ! nvcc=$(nvcc_path); then
  if [ "$want" = cuda ]; then
    echo "error: QES_EDGE_GPU=cuda but nvcc is not found (install the CUDA toolkit, or put its bin/ on PATH)" >&2
    exit 2
  fi
  echo "no nvcc: the CPU build" >&2; echo cpu; exit 0
fi
if ! arch=$(gpu_arch); then
  if [ "$want" = cuda ]; then
    echo "error: QES_EDGE_GPU=cuda but no NVIDIA GPU is found (nvidia-smi lists none, no Jetson device tree):" \
         "name its architecture with QES_EDGE_CUDA_ARCH=87" >&2
    exit 2
  fi
  echo "nvcc at $nvcc but no NVIDIA GPU found: the CPU build" >&2; echo cpu; exit 0
fi
echo "nvcc at $nvcc and a GPU of architecture sm_$arch: the CUDA build" >&2
echo "cuda $arch"
