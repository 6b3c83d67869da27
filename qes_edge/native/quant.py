"""The code range of each GGUF quantization type qes-edge trains, from libqes, and the check that
refuses the others (the type table itself is types.py)."""

from __future__ import annotations

from dataclasses import dataclass

from qes_edge.native.binding import ffi, lib
# the type table, re-exported: the engine's callers name the types and QESError from here
from qes_edge.native.types import (FLOAT_TYPES, GGML_TYPES, QT, TRAINABLE, QESError,  # noqa: F401
                                   is_trainable, type_name)


@dataclass(frozen=True)
class TypeInfo:
    qtype: QT
    block_elems: int
    block_bytes: int
    cmin: int
    cmax: int


def type_info(qtype, tensor: str = "?") -> TypeInfo:
    """Block size and code range of a trainable type; QESError for any other type."""
    out = ffi.new("qes_type_info *")
    if lib.qes_type_query(int(qtype), out) != lib.QES_OK:
        if int(qtype) in [int(t) for t in FLOAT_TYPES]:
            why = "is a float type: it holds no integer codes (norms and such are left alone)"
        else:
            why = ("has no ordered integer code that qes-edge can train "
                   "(supported: " + " ".join(t.name for t in TRAINABLE) + ")")
        raise QESError(f"tensor {tensor!r}: {type_name(qtype)} {why}")
    return TypeInfo(QT(int(qtype)), out.block_elems, out.block_bytes, out.cmin, out.cmax)
