"""The CUDA plugin (libqes_cuda.so beside libqes) builds wherever nvcc exists, exports what
backend.c looks up, and reports itself honestly: compiled in, available only with a GPU.

Its byte-identity with portable needs a GPU: there tests/test_backends.py and test_native run
every available backend, cuda included (scripts/test_gpu.sh runs them in one go on a GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qes_edge.native import binding as _native

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ("qes_cuda_ops", "qes_cuda_available")
NOT_USABLE = "backend 'cuda' is compiled in but not usable on this machine"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _has_gpu() -> bool:
    """A CUDA device node (the driver is loaded and sees a GPU)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvgpu").exists()  # nvgpu: Jetson


pytestmark = pytest.mark.skipif(_nvcc() is None, reason="no nvcc: the CUDA plugin is not built here")


def _exported(lib: Path) -> set[str]:
    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
        return {line.split()[-1] for line in out.splitlines() if line.strip()}
    code = ("import ctypes, sys; l = ctypes.CDLL(sys.argv[1]); "
            "print(' '.join(s for s in sys.argv[2:] if hasattr(l, s)))")
    out = subprocess.run([sys.executable, "-c", code, str(lib), *SYMBOLS], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def _python(code: str, lib: Path | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (so that what it loads is its own), on libqes `lib`."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(lib, **env_extra),
                          timeout=120)


def _env(lib: Path | None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("QES_EDGE_BACKEND", "QES_EDGE_LIB")}
    if lib is not None:
        env["QES_EDGE_LIB"] = str(lib)
    env["PYTHONPATH"] = str(ROOT)  # this checkout's qes_edge, on the libqes asked for
    return {**env, **extra}


REGISTRY = ("import qes_edge.native.binding as n; l = n.lib; "
            "print(l.qes_backend_compiled(3), l.qes_backend_available(3), n.ffi.string(l.qes_backend_name(3)).decode())")


def _check_library(libqes: Path) -> None:
    plugin = libqes.parent / "libqes_cuda.so"
    assert plugin.is_file(), f"{plugin} was not built"
    assert set(SYMBOLS) <= _exported(plugin)
    r = _python(REGISTRY, libqes)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1" if _has_gpu() else "0", "cuda"]
    if not _has_gpu():  # asked for by name, it is refused in one line: never a silent fallback
        r = subprocess.run([sys.executable, "-m", "qes_edge", "info"], capture_output=True, text=True, timeout=120,
                           env=_env(libqes, QES_EDGE_BACKEND="cuda"))
        assert r.returncode != 0
        err = r.stderr.strip()
        assert NOT_USABLE in err and "\n" not in err, err


def test_the_plugin_builds_with_cmake(tmp_path):
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    gen = ["-G", "Ninja"] if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").is_file() else []
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    build = tmp_path / "build"
    cfg = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DQES_CUDA=ON",
                          f"-DCMAKE_CUDA_COMPILER={_nvcc()}"], capture_output=True, text=True, env=env, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    assert "native backends built:" in cfg.stdout and "cuda" in cfg.stdout.split("native backends built:")[1].splitlines()[0]
    bld = subprocess.run([cmake, "--build", str(build), "--target", "qes_cuda"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    _check_library(build / "libqes.so")


def test_the_installed_package_has_the_plugin():
    libqes = Path(_native.library_path)
    if os.environ.get("QES_EDGE_LIB"):
        pytest.skip("QES_EDGE_LIB points at a libqes of its own")
    assert (libqes.parent / "libqes_cuda.so").is_file(), (
        f"nvcc is here but {libqes.parent} has no libqes_cuda.so: reinstall (pip install .) to build it")
    _check_library(libqes)


def test_importing_does_not_load_the_plugin():
    """A process that never asks for CUDA never maps it (nor the CUDA runtime linked into it)."""
    code = ("import qes_edge.native.binding as n; maps = lambda: 'libqes_cuda' in open('/proc/self/maps').read(); "
            "before = maps(); n.backends(); print(before, maps())")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]  # absent after import, present once asked about


@pytest.mark.skipif(_has_gpu(), reason="with a GPU the kernels themselves run (test_native, test_backends.py); "
                                        "the emulation also checks the no-GPU answers")
def test_the_kernel_phases_emulated_on_the_host_match_portable(tmp_path):
    """native/tests/cuda_emulation.cu runs every kernel phase of ops_cuda.cu on the host, thread
    by thread in a shuffled order, against the portable driver: masks, bytes, applied counts,
    foreign restores, both update modes, and every bad argument's error code."""
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DQES_CUDA=OFF", "-DQES_AVX2=OFF"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    exe = tmp_path / "cuda_emulation"
    r = subprocess.run([_nvcc(), "-std=c++17", "-I", str(ROOT / "native/include"), "-I", str(ROOT / "native/src"),
                        "-arch=sm_80", str(ROOT / "native/tests/cuda_emulation.cu"), "-o", str(exe), "-L", str(build),
                        "-lqes", "-Xlinker", f"-rpath={build}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and ", 0 failed" in r.stdout, r.stdout[-3000:]
    assert int(r.stdout.split(" checks")[0].split()[-1]) > 2000 and "foreign restores" in r.stdout
