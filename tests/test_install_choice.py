"""scripts/gpu_choice.sh, the install's choice of llama.cpp build (issue 25): CUDA for the GPU's
own architecture where nvcc and an NVIDIA GPU are both present, the CPU build everywhere else
(CI's, unchanged), QES_EDGE_GPU forcing either.  nvcc and nvidia-smi are stand-in scripts on PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_choice.sh"


def _tool(d: Path, name: str, body: str) -> None:
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)


def choose(tmp_path, nvcc=False, smi=None, tree=None, **env):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name in ("nvcc", "nvidia-smi"):
        (bin_ / name).unlink(missing_ok=True)
    if nvcc:
        _tool(bin_, "nvcc", "echo 'Cuda compilation tools, release 12.4'")
    if smi is not None:
        _tool(bin_, "nvidia-smi", f"echo '{smi}'")
    dt = tmp_path / "compatible"
    if tree is not None:
        dt.write_bytes(tree)
    e = {"PATH": f"{bin_}:/usr/bin:/bin", "CUDA_HOME": str(tmp_path / "no-cuda"), "QES_EDGE_DEVICE_TREE": str(dt),
         **env}
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=e)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def test_no_toolkit_or_no_gpu_is_the_cpu_build(tmp_path):
    assert choose(tmp_path)[:2] == (0, "cpu")
    rc, out, why = choose(tmp_path, nvcc=True)  # this machine: nvcc, no GPU
    assert (rc, out) == (0, "cpu") and "no NVIDIA GPU found" in why
    assert choose(tmp_path, smi="9.0")[:2] == (0, "cpu")  # a GPU without the toolkit


def test_nvcc_and_a_gpu_build_for_that_gpu_s_architecture(tmp_path):
    assert choose(tmp_path, nvcc=True, smi="9.0")[:2] == (0, "cuda 90")    # an H100
    assert choose(tmp_path, nvcc=True, smi="8.6")[:2] == (0, "cuda 86")    # an RTX 30x0
    # a Jetson has no nvidia-smi: its device tree names the SoC
    assert choose(tmp_path, nvcc=True, tree=b"nvidia,p3737-0000+p3701-0000\0nvidia,tegra234\0")[:2] == (0, "cuda 87")
    assert choose(tmp_path, nvcc=True, tree=b"nvidia,jetson-xavier\0nvidia,tegra194\0")[:2] == (0, "cuda 72")


def test_qes_edge_gpu_forces_either_build_or_says_why_not(tmp_path):
    assert choose(tmp_path, nvcc=True, smi="9.0", QES_EDGE_GPU="cpu")[:2] == (0, "cpu")
    rc, out, why = choose(tmp_path, QES_EDGE_GPU="cuda")
    assert rc == 2 and out == "" and "nvcc is not found" in why
    rc, out, why = choose(tmp_path, nvcc=True, QES_EDGE_GPU="cuda")
    assert rc == 2 and "QES_EDGE_CUDA_ARCH=87" in why
    assert choose(tmp_path, nvcc=True, QES_EDGE_GPU="cuda", QES_EDGE_CUDA_ARCH="87")[:2] == (0, "cuda 87")
    rc, _, why = choose(tmp_path, QES_EDGE_GPU="metal")
    assert rc == 2 and "choose auto, cuda or cpu" in why

