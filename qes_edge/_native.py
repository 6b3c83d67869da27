"""Load libqes through cffi (ABI mode) and pick its backend.

The declarations are read from the installed ``qes.h`` (between BEGIN CDEF and END CDEF), so
the binding can never drift from the header; they come pre-parsed from ``_qes_ffi.py`` (made by
``_ffi_gen.py``) while its recorded hash matches them, which keeps pycparser out of the process.  The backend is chosen by the environment
variable ``QES_EDGE_BACKEND`` (``auto`` | ``portable`` | ``avx2``) and reported by
:data:`backend`; asking for one that is not available raises, it never falls back silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ._ffi_gen import cdef_of, cdef_sha256

_HERE = Path(__file__).resolve().parent
_LIB_NAMES = {"linux": "libqes.so", "darwin": "libqes.dylib"}


class NativeLibraryMissing(ImportError):
    pass


def _find(name: str) -> Path:
    override = os.environ.get("QES_EDGE_LIB")
    candidates = [Path(override)] if override else []
    candidates += [_HERE / name]
    try:  # running from a source checkout: use the build that `pip install .` put in site-packages
        from importlib.metadata import PackageNotFoundError, distribution
        candidates.append(Path(distribution("qes-edge").locate_file(f"qes_edge/{name}")))
    except PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise NativeLibraryMissing(
        f"libqes ({name}) was not found next to {__file__}. The package was installed without "
        "its native build: reinstall with `pip install .` from the checkout (needs a C compiler "
        "and CMake: apt-get install build-essential cmake), or point QES_EDGE_LIB at a built libqes."
    )


def _header_cdef(lib_path: Path) -> str:
    for h in (lib_path.parent / "include" / "qes.h", _HERE / "include" / "qes.h",
              _HERE.parent / "native" / "include" / "qes.h"):
        if h.is_file():
            cdef = cdef_of(h.read_text())
            if cdef is not None:
                return cdef
    raise NativeLibraryMissing("qes.h (the binding's declarations) is missing from the installation")


def _make_ffi(cdef: str):
    """(ffi, mode): the generated out-of-line module where it was made from these declarations
    (no C parser in the process), else cffi parsing them in-line."""
    try:
        from . import _qes_ffi
        if _qes_ffi.CDEF_SHA256 == cdef_sha256(cdef):
            return _qes_ffi.ffi, "out-of-line"
    except Exception:  # missing, or made by a cffi this one cannot read: parse instead
        pass
    import cffi
    f = cffi.FFI()
    f.cdef(cdef)
    return f, "in-line"


_lib_path = _find(_LIB_NAMES.get(sys.platform, "libqes.so"))
ffi, ffi_mode = _make_ffi(_header_cdef(_lib_path))
lib = ffi.dlopen(str(_lib_path))

BACKENDS = {"portable": lib.QES_BACKEND_PORTABLE, "avx2": lib.QES_BACKEND_AVX2}


def available_backends() -> list[str]:
    return [name for name, code in BACKENDS.items() if lib.qes_backend_available(code)]


def set_backend(name: str) -> str:
    """Select the kernel table; 'auto' picks the fastest available. Returns the active name,
    also reported by the module attribute `backend`."""
    global backend
    if name == "auto":
        lib.qes_set_backend(lib.QES_BACKEND_AUTO)
    elif name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose auto, {', '.join(BACKENDS)}")
    elif lib.qes_set_backend(BACKENDS[name]) != lib.QES_OK:
        raise RuntimeError(
            f"backend {name!r} is not available here (available: {', '.join(available_backends())})")
    backend = get_backend()
    return backend


def get_backend() -> str:
    code = lib.qes_get_backend()
    return next(name for name, c in BACKENDS.items() if c == code)


backend = set_backend(os.environ.get("QES_EDGE_BACKEND", "auto"))
library_path = str(_lib_path)
