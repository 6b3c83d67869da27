"""The GGUF quantization types qes-edge trains, and the checks that refuse the others."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from ._native import ffi, lib

#: Types whose elements are ordered integer codes inside llama.cpp blocks.
TRAINABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
#: Types left alone by training (norms, biases): never codes.
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16, QT.F64)


class QESError(ValueError):
    """Bad input for the engine; the message names the tensor and the problem."""


@dataclass(frozen=True)
class TypeInfo:
    qtype: QT
    block_elems: int
    block_bytes: int
    cmin: int
    cmax: int


def type_name(qtype) -> str:
    try:
        return QT(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


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


def is_trainable(qtype) -> bool:
    return int(qtype) in [int(t) for t in TRAINABLE]
