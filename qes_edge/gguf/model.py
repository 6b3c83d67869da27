"""A GGUF file's trainable tensors as CodeTensors over a private, copy-on-write mapping.

The header is read by our own validator (gguf_check); the tensor bytes are mapped, never read
in full, so opening a model costs almost no memory until its codes are edited.  Edits never
reach the file on disk (the mapping is private), so a crash cannot leave a half-edited model."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from qes_edge.atomic import atomic_output
from qes_edge.gguf.check import GGUFInvalid, TensorInfo, check_gguf
from qes_edge.native.engine import CodeTensor, digest_tensors
from qes_edge.native.quant import FLOAT_TYPES, QESError, is_trainable, type_name
from qes_edge.native.types import DEFAULT_FROZEN  # noqa: F401 (the drivers and sessions read it from here)



def file_sha256(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def trainable_infos(tensors: tuple[TensorInfo, ...], frozen=DEFAULT_FROZEN) -> list[TensorInfo]:
    """The tensors a run trains: every one whose type holds integer codes, except the frozen names.
    A tensor with no ordered code (IQ*, ...) that would be trained is refused with its name."""
    out = []
    floats = {int(t) for t in FLOAT_TYPES}
    for t in tensors:
        if t.name in frozen or t.ggml_type in floats:
            continue
        if not is_trainable(t.ggml_type):
            raise QESError(f"tensor {t.name!r}: {type_name(t.ggml_type)} has no ordered integer code that qes-edge "
                           "can train; freeze it or use a model quantized to Q4_0..Q8_0 or K-quants")
        out.append(t)
    return out


class GGUFModel:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.header = check_gguf(self.path)  # our own strict checks first
        except GGUFInvalid as e:
            raise QESError(str(e)) from None
        self._map = None

    @property
    def data(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        return self._map

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        return self.data[t.offset:t.offset + t.n_bytes]

    def code_tensors(self, frozen=DEFAULT_FROZEN) -> list[CodeTensor]:
        return [CodeTensor(t.name, t.ggml_type, t.n_elements, self.tensor_bytes(t))
                for t in trainable_infos(self.header.tensors, frozen)]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per type: tensor count, elements and bytes."""
        out: dict[str, dict[str, int]] = {}
        for t in self.header.tensors:
            row = out.setdefault(type_name(t.ggml_type), {"tensors": 0, "elements": 0, "bytes": 0})
            row["tensors"] += 1
            row["elements"] += t.n_elements
            row["bytes"] += t.n_bytes
        return out

    def weights_digest(self, tensors: list[CodeTensor]) -> str:
        return digest_tensors(tensors)

    def write(self, tensors: list[CodeTensor], out: str | Path) -> None:
        """Copy the file to out with the tensors' current bytes, atomically: a temporary file in the
        same folder, fsync, rename, fsync of the folder.  A crash or a full disk leaves the old out
        (or none) and no temporary file."""
        offsets = {t.name: t.offset for t in self.header.tensors}  # absolute file offsets
        with atomic_output(out, "wb") as (_tmp, f):
            with open(self.path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
            for t in tensors:
                f.seek(offsets[t.name])
                f.write(t.read_bytes() if t._array is None else np.ascontiguousarray(t._array).tobytes())
