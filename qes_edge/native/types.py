"""The GGUF quantization types (ggml's type ids), which of them hold integer codes qes-edge trains,
and QESError: plain Python, so that the model-file checks and the chat templates can name them
without loading the C library (quant.py adds what libqes answers: each type's code range)."""

from __future__ import annotations

from enum import IntEnum

# ggml's type ids with (block elements, block bytes), as in ggml.h / gguf.constants (a test keeps
# them equal).  Our own table: importing the gguf package costs ~6 MB of memory on every run.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
QT = IntEnum("GGMLType", {name: tid for tid, (name, _, _) in GGML_TYPES.items()})

#: Tensors a default run leaves alone although their type holds codes: the token embedding is
#: tied to the output head in small models and dominates their size.
DEFAULT_FROZEN = ("token_embd.weight", "output.weight")

#: Types whose elements are ordered integer codes inside llama.cpp blocks.
TRAINABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
#: Types left alone by training (norms, biases): never codes.
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16, QT.F64)


class QESError(ValueError):
    """Bad input for the engine; the message names the tensor and the problem."""


def type_name(qtype) -> str:
    try:
        return QT(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def is_trainable(qtype) -> bool:
    return int(qtype) in [int(t) for t in TRAINABLE]
