"""The cffi binding: its pre-parsed declarations (`_qes_ffi.py`) are those of qes.h, and a
stale or missing module falls back to parsing the header, never to wrong declarations."""

import subprocess
import sys
from pathlib import Path

from qes_edge.native import binding as _native
from qes_edge.native.ffi_gen import OUT, cdef_of, generate

HEADER = Path(__file__).resolve().parents[1] / "native" / "include" / "qes.h"  # the checkout's


def test_the_committed_module_is_what_the_header_generates():
    assert OUT.read_text() == generate(HEADER), "qes.h changed: run `python -m qes_edge.native.ffi_gen` and commit"


def test_the_binding_loads_without_a_c_parser():
    assert _native.ffi_mode == "out-of-line"
    code = "import sys, qes_edge.native.binding as n; print(n.ffi_mode, any('pycparser' in m for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["out-of-line", "False"]


def test_declarations_that_differ_are_parsed_in_line():
    cdef = cdef_of(HEADER.read_text())
    ffi, mode = _native._make_ffi(cdef + "\nint qes_not_in_the_module(void);\n")
    assert mode == "in-line"
    lib = ffi.dlopen(_native.library_path)
    assert lib.qes_noise_spec_version() == _native.lib.qes_noise_spec_version()
    assert lib.QES_BACKEND_AVX2 == _native.lib.QES_BACKEND_AVX2
