"""Load libqes through cffi (ABI mode) and pick its backend.

The declarations are read from the installed ``qes.h`` (between BEGIN CDEF and END CDEF), so
the binding can never drift from the header; they come pre-parsed from ``_qes_ffi.py`` (made by
``_ffi_gen.py``) while its recorded hash matches them, which keeps pycparser out of the process.  The backend is chosen by the environment
variable ``QES_EDGE_BACKEND`` (``auto`` or a name of the C library's registry: ``portable``,
``avx2``, ``neon``, ``cuda``, ``metal``) and reported by
:data:`backend`; asking for one that is not available raises, it never falls back silently.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qes_edge.native.ffi_gen import cdef_of, cdef_sha256
from qes_edge.native.errors import BackendUnavailable, NativeLibraryMissing  # noqa: F401 (raised by callers' imports)

_HERE = Path(__file__).resolve().parent
_PACKAGE = _HERE.parent  # the build installs libqes and include/qes.h at the package's top (CMakeLists.txt)
_LIB_NAMES = {"linux": "libqes.so", "darwin": "libqes.dylib"}


def _find(name: str) -> Path:
    override = os.environ.get("QES_EDGE_LIB")
    candidates = [Path(override)] if override else []
    candidates += [_PACKAGE / name]
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
    for h in (lib_path.parent / "include" / "qes.h", _PACKAGE / "include" / "qes.h",
              _PACKAGE.parent / "native" / "include" / "qes.h"):
        if h.is_file():
            cdef = cdef_of(h.read_text())
            if cdef is not None:
                return cdef
    raise NativeLibraryMissing("qes.h (the binding's declarations) is missing from the installation")


def _make_ffi(cdef: str):
    """(ffi, mode): the generated out-of-line module where it was made from these declarations
    (no C parser in the process), else cffi parsing them in-line."""
    try:
        from qes_edge.native import _qes_ffi
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


def _name(backend_id: int) -> str:
    return ffi.string(lib.qes_backend_name(backend_id)).decode()


#: every backend qes-edge knows, compiled in or not (the registry's names: nothing is loaded to list
#: them; a plugin backend's library is opened only when it is asked about)
BACKENDS = {_name(i): i for i in range(lib.qes_backend_count())}


def _registry() -> list[dict]:
    """The C library's backend registry, row by row: the one list of backends."""
    return [{"id": i, "name": name, "compiled": bool(lib.qes_backend_compiled(i)),
             "available": bool(lib.qes_backend_available(i)), "device": bool(lib.qes_backend_is_device(i))}
            for name, i in BACKENDS.items()]


def backends() -> list[dict]:
    """Each backend: id, name, compiled (built into this libqes), available (usable on this
    machine), device (its tensors live in its own memory: cuda, metal)."""
    return _registry()


def available_backends(include_device: bool = False) -> list[str]:
    """The backends usable here; host backends only unless include_device (a device backend
    needs the tensors in its memory: engine.on_backend copies them there)."""
    return [r["name"] for r in _registry() if r["available"] and (include_device or not r["device"])]


def is_device(name: str) -> bool:
    return bool(lib.qes_backend_is_device(BACKENDS[name]))


def set_backend(name: str) -> str:
    """Select the backend; 'auto' picks the fastest available host backend.  Returns the
    active name, also reported by the module attribute `backend`.  A name that is not
    compiled in or not usable here raises: it never falls back silently."""
    global backend
    if name == "auto":
        lib.qes_set_backend(lib.QES_BACKEND_AUTO)
    elif name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose auto, {', '.join(BACKENDS)}")
    elif lib.qes_set_backend(BACKENDS[name]) != lib.QES_OK:
        why = "not compiled into this libqes" if not lib.qes_backend_compiled(BACKENDS[name]) else \
            "compiled in but not usable on this machine"
        raise BackendUnavailable(f"backend {name!r} is {why} (available: {', '.join(available_backends(True))}; "
                           f"compiled in: {', '.join(r['name'] for r in _registry() if r['compiled'])})")
    backend = get_backend()
    return backend


def get_backend() -> str:
    return _name(lib.qes_get_backend())


_asked = os.environ.get("QES_EDGE_BACKEND", "auto")
try:
    backend = set_backend(_asked)
except (ValueError, BackendUnavailable) as _e:
    raise BackendUnavailable(f"QES_EDGE_BACKEND={_asked}: {_e}") from None
library_path = str(_lib_path)
