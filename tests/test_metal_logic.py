"""The Metal backend's per-thread logic (native/src/metal/qes_metal_kernels.h) against the golden
vectors, here where there is no Metal: native/tests/metal_logic.c runs those thread functions in
the kernels' grid order on the host, built once as C and once as C++ (Metal's language is C++),
and each golden perturb/restore and update case must give its bytes, mask, counts and residual.
The Metal kernels and host code themselves (qes_metal.metal, ops_metal.m) build only on macOS."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cffi import FFI

import make_golden as M
from test_golden import GOLDEN, input_bytes, residual_of, sha
from qes_edge.native.engine import tensor_id
from qes_edge.native.quant import QT

ROOT = Path(__file__).resolve().parents[1]
CDEF = """
int mtl_perturb(int type, uint64_t n_elements, uint8_t *data, uint64_t tensor_id, int64_t seed, uint32_t p32,
                uint8_t *mask, uint64_t mask_bytes, int write, uint64_t *applied);
int mtl_update(int type, uint64_t n_elements, uint8_t *data, uint64_t tensor_id, uint32_t n_steps,
               const uint32_t *term_start, const uint64_t *term_seed, const int32_t *term_coef, const uint32_t *p32,
               int32_t *residual, int32_t beta_q14, int32_t clamp_q16, int anti_windup, uint64_t *changed,
               uint64_t *dropped);
"""


@pytest.fixture(scope="module", params=[("cc", "c"), ("c++", "c++")], ids=["as-C", "as-C++"])
def logic(request, tmp_path_factory):
    compiler, lang = request.param
    exe = shutil.which(compiler) or shutil.which("gcc" if lang == "c" else "g++")
    if exe is None:
        pytest.skip(f"no {compiler} compiler")
    out = tmp_path_factory.mktemp("metal") / f"metal_logic_{lang.replace('+', 'p')}.so"
    subprocess.run([exe, "-x", lang, "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-I", str(ROOT / "native/include"), "-I", str(ROOT / "native/src/metal"),
                    str(ROOT / "native/tests/metal_logic.c"), "-o", str(out)], check=True)
    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(out))


def ptr(ffi, arr, ctype):
    return ffi.cast(ctype, arr.ctypes.data) if arr is not None else ffi.NULL


@pytest.mark.parametrize("case", GOLDEN["perturb"], ids=lambda c: f"{c['type']}:{c['seed']}")
def test_perturb_restore(logic, case):
    ffi, lib = logic
    data = input_bytes(case)
    original = data.copy()
    mask = np.full(case["mask_bytes"], 0xAA, np.uint8)  # perturb must clear what it does not set
    applied = ffi.new("uint64_t *")
    tid = tensor_id(case["tensor"])
    assert lib.mtl_perturb(int(QT[case["type"]]), case["n_elements"], ptr(ffi, data, "uint8_t *"), tid, case["seed"],
                           case["p32"], ptr(ffi, mask, "uint8_t *"), mask.nbytes, 1, applied) == 0
    assert mask.tobytes().hex() == case["mask"] and applied[0] == case["applied"]
    assert sha(data) == case["bytes_after_sha256"]
    assert lib.mtl_perturb(int(QT[case["type"]]), case["n_elements"], ptr(ffi, data, "uint8_t *"), tid, case["seed"],
                           case["p32"], ptr(ffi, mask, "uint8_t *"), mask.nbytes, 0, applied) == 0
    assert np.array_equal(data, original) and applied[0] == case["applied"]


def merged(step):
    """The host's qes_merge_members: one term per |seed| with its net coefficient, zeros dropped."""
    net = {}
    for s, c in zip(step["seeds"], step["coefs_q16"]):
        if c:
            net[abs(s)] = net.get(abs(s), 0) + (c if s > 0 else -c)
    return [(s, c) for s, c in sorted(net.items()) if c]


@pytest.mark.parametrize("case", GOLDEN["update"], ids=lambda c: f"{c['type']}:{c['mode']}")
def test_update(logic, case):
    ffi, lib = logic
    data = input_bytes(case)
    r = residual_of(case)
    terms = [merged(s) for s in case["steps"]]
    start = np.cumsum([0] + [len(t) for t in terms]).astype(np.uint32)
    seeds = np.array([s for t in terms for s, _ in t] or [0], np.uint64)
    coefs = np.array([c for t in terms for _, c in t] or [0], np.int32)
    p32 = np.array([s["p32"] for s in case["steps"]], np.uint32)
    changed, dropped = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    assert lib.mtl_update(int(QT[case["type"]]), case["n_elements"], ptr(ffi, data, "uint8_t *"),
                          tensor_id(case["tensor"]), len(terms), ptr(ffi, start, "uint32_t *"),
                          ptr(ffi, seeds, "uint64_t *"), ptr(ffi, coefs, "int32_t *"), ptr(ffi, p32, "uint32_t *"),
                          ptr(ffi, r, "int32_t *"), case["beta_q14"], case["clamp_q16"], int(case["anti_windup"]),
                          changed, dropped) == 0
    assert sha(data) == case["bytes_after_sha256"]
    assert (changed[0], dropped[0]) == (case["changed"], case["dropped"])
    if r is not None:
        assert M.res_sha(r) == case["residual_after_sha256"]


def test_the_metal_source_parses_with_its_vocabulary_stubbed(tmp_path):
    """qes_metal.metal assembled as cmake/metal.cmake does (the shared headers, the per-thread
    functions, the kernels; quoted includes dropped), with Metal's keywords stubbed as C++
    (native/tests/metal_stub.h): a typo or a type error in the kernels fails here, not only on a Mac."""
    import re
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler")
    parts = ["native/include/qes_blocks.h", "native/include/qes_noise.h", "native/include/qes_perturb.h",
             "native/include/qes_update.h",
             "native/src/metal/qes_metal_kernels.h", "native/src/metal/qes_metal.metal"]
    cmake = (ROOT / "cmake/metal.cmake").read_text()
    assert all(p in cmake for p in parts), "cmake/metal.cmake assembles another list"
    text = '#include "metal_stub.h"\n' + "\n".join(
        re.sub(r'#include (<metal_stdlib>|"[^"]*")', "", (ROOT / p).read_text()) for p in parts)
    src = tmp_path / "qes_metal_source.cpp"
    src.write_text(text)
    r = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-attributes",
                        "-Wno-unused-function", "-I", str(ROOT / "native/tests"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
