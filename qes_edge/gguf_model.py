"""A GGUF file's trainable tensors as CodeTensors over an in-memory, copy-on-write mapping.

Edits never reach the file on disk: the mapping is private (numpy 'c' mode), so a crash can
never leave a half-edited model behind."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from .engine import CodeTensor, digest_tensors
from .gguf_check import GGUFInvalid, check_gguf
from .quant import QESError, is_trainable, type_name

#: Tensors a default run leaves alone although their type holds codes: the token embedding is
#: tied to the output head in small models and dominates their size.
DEFAULT_FROZEN = ("token_embd.weight", "output.weight")


def file_sha256(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class GGUFModel:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.header = check_gguf(self.path)  # our own strict checks first
        except GGUFInvalid as e:
            raise QESError(str(e)) from None
        try:
            self.reader = GGUFReader(self.path, "c")
        except Exception as e:  # gguf raises assorted errors on malformed files
            raise QESError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def tensor_bytes(self, t) -> np.ndarray:
        return self.reader.data[t.data_offset:t.data_offset + t.n_bytes]

    def code_tensors(self, frozen=DEFAULT_FROZEN) -> list[CodeTensor]:
        """Every tensor whose type holds integer codes, except the frozen names.  A tensor of a
        type with no ordered code (IQ*) that would be trained is refused with its name."""
        out = []
        for t in self.reader.tensors:
            if t.name in frozen or t.tensor_type.name in ("F32", "F16", "BF16", "F64"):
                continue
            if not is_trainable(t.tensor_type):
                raise QESError(f"tensor {t.name!r}: {type_name(t.tensor_type)} has no ordered integer code "
                               "that qes-edge can train; freeze it or use a model quantized to Q4_0..Q8_0 or K-quants")
            out.append(CodeTensor(t.name, t.tensor_type, int(t.n_elements), self.tensor_bytes(t)))
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        """Per type: tensor count, elements and bytes."""
        out: dict[str, dict[str, int]] = {}
        for t in self.reader.tensors:
            row = out.setdefault(t.tensor_type.name, {"tensors": 0, "elements": 0, "bytes": 0})
            row["tensors"] += 1
            row["elements"] += int(t.n_elements)
            row["bytes"] += int(t.n_bytes)
        return out

    def weights_digest(self, tensors: list[CodeTensor]) -> str:
        return digest_tensors(tensors)

    def write(self, tensors: list[CodeTensor], out: str | Path) -> None:
        """Copy the file to out with the tensors' current bytes, atomically: a temporary file in the
        same folder, fsync, rename, fsync of the folder.  A crash leaves the old out or none."""
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(self.path, tmp)
        offsets = {t.name: t.data_offset for t in self.reader.tensors}  # absolute file offsets
        with open(tmp, "r+b") as f:
            for t in tensors:
                f.seek(offsets[t.name])
                f.write(np.ascontiguousarray(t._array).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
