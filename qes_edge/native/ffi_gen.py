"""Generate `_qes_ffi.py`, cffi's out-of-line ABI module for the declarations in qes.h.

Parsing C declarations at import (cffi's in-line mode) loads pycparser and keeps its tables,
about 3 MB of a training process's resident set; the generated module holds the parsed types
as bytes and imports only `_cffi_backend`.  It is committed beside `binding.py` and records the
sha256 of the declarations it came from: `binding` uses it only while that matches the header it
loads (else it parses the header in-line, as before), and a test fails when it is stale.

    python -m qes_edge.native.ffi_gen            # rewrite qes_edge/native/_qes_ffi.py from native/include/qes.h
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE.parent.parent / "native" / "include" / "qes.h"
OUT = HERE / "_qes_ffi.py"


def cdef_of(header_text: str) -> str | None:
    """The binding's declarations: the header between BEGIN CDEF and END CDEF."""
    m = re.search(r"/\* BEGIN CDEF \*/(.*)/\* END CDEF \*/", header_text, re.S)
    return m.group(1) if m else None


def cdef_sha256(cdef: str) -> str:
    return hashlib.sha256(cdef.encode()).hexdigest()


def generate(header: Path = HEADER) -> str:
    """The text of `_qes_ffi.py` for this header."""
    import tempfile

    import cffi
    cdef = cdef_of(header.read_text())
    if cdef is None:
        raise SystemExit(f"{header}: no BEGIN CDEF / END CDEF section")
    builder = cffi.FFI()
    builder.cdef(cdef)
    builder.set_source("qes_edge.native._qes_ffi", None)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "_qes_ffi.py"
        with contextlib.redirect_stdout(io.StringIO()):  # cffi prints 'generating ...'
            builder.emit_python_code(str(path))
        body = path.read_text()
    return body + f"\n# sha256 of the declarations in qes.h this was generated from (qes_edge/native/ffi_gen.py)\n" \
                  f"CDEF_SHA256 = {cdef_sha256(cdef)!r}\n"


if __name__ == "__main__":
    OUT.write_text(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HEADER))
    print(f"wrote {OUT}")
