"""Validate a GGUF file's header with our own strict parser, before anything else reads it.

GGUF files are an attack surface: llama.cpp's loader has had integer-overflow and out-of-bounds
bugs (dimension products that wrap, ne == 0, unchecked array element types, offsets past the
end).  This reader checks every count against the bytes that remain, every size product
against overflow, every tensor's data range against the file size, and refuses what llama.cpp
or the `gguf` package would misread, with a message that says what is wrong and where.
It reads only the header (metadata and tensor table), never the tensor data.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .quant import GGML_TYPES

MAGIC = b"GGUF"
MAX_COUNT = 1 << 24          # tensors or metadata entries: far beyond any real model
MAX_STRING = 1 << 24         # one metadata string
MAX_NAME = 63                # GGML_MAX_NAME - 1
MAX_DIM = 1 << 62
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (name, fixed size or None)
VALUE_TYPES = {0: ("u8", 1), 1: ("i8", 1), 2: ("u16", 2), 3: ("i16", 2), 4: ("u32", 4), 5: ("i32", 4),
               6: ("f32", 4), 7: ("bool", 1), 8: ("string", None), 9: ("array", None), 10: ("u64", 8),
               11: ("i64", 8), 12: ("f64", 8)}


class GGUFInvalid(ValueError):
    """The file is not a GGUF that qes-edge will hand to llama.cpp."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int            # absolute offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    version: int
    alignment: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata_keys: tuple[str, ...]


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, msg: str):
        raise GGUFInvalid(f"{self.path}: {msg} (at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"truncated: {what} needs {n} bytes, {len(self.data) - self.pos} remain")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self, what):
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what):
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what, limit=MAX_STRING) -> str:
        n = self.u64(f"{what} length")
        if n > limit:
            self.fail(f"{what} is {n} bytes long (limit {limit})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype not in VALUE_TYPES:
            self.fail(f"{what}: unknown value type {vtype}")
        name, size = VALUE_TYPES[vtype]
        if name == "string":
            return self.string(what)
        if name == "array":
            etype = self.u32(f"{what} element type")
            if etype not in VALUE_TYPES:
                self.fail(f"{what}: array of unknown element type {etype}")
            if VALUE_TYPES[etype][0] == "array":
                self.fail(f"{what}: arrays of arrays are not supported")
            count = self.u64(f"{what} element count")
            esize = VALUE_TYPES[etype][1]
            remain = len(self.data) - self.pos
            if count > MAX_COUNT * 16 or count * (esize or 8) > remain:
                self.fail(f"{what}: array of {count} elements does not fit in the {remain} bytes that remain")
            if esize:
                self.take(count * esize, what)
                return None
            for i in range(count):
                self.string(f"{what}[{i}]")
            return None
        raw = self.take(size, what)
        if name == "u32":
            return struct.unpack("<I", raw)[0]
        return None


def check_gguf(path: str | Path) -> Header:
    """Parse and check the header of a GGUF file; GGUFInvalid says what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFInvalid(f"{path}: {size} bytes is too short for a GGUF header")
            # a read-only mapping: only the header pages are ever touched (no RSS for the weights)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _check(mm, size, path)
    except OSError as e:
        raise GGUFInvalid(f"{path}: cannot read ({e.strerror})") from None


def _check(head, size: int, path: Path) -> Header:
    r = _Reader(head, str(path))
    if len(head) < 4 or head[:4] != MAGIC:
        raise GGUFInvalid(f"{path}: not a GGUF file (no GGUF magic)")
    r.pos = 4
    version = r.u32("version")
    if version not in (2, 3):
        r.fail(f"unsupported GGUF version {version} (2 and 3 are)")
    n_tensors, n_kv = r.u64("tensor count"), r.u64("metadata count")
    if n_tensors > MAX_COUNT or n_tensors * 24 > size:
        r.fail(f"tensor count {n_tensors} is impossible for a {size}-byte file")
    if n_kv > MAX_COUNT or n_kv * 12 > size:
        r.fail(f"metadata count {n_kv} is impossible for a {size}-byte file")
    alignment = DEFAULT_ALIGNMENT
    keys = []
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}", limit=65535)
        vtype = r.u32(f"type of {key!r}")
        v = r.value(vtype, f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != 4 or not v or v & (v - 1):
                r.fail(f"general.alignment must be a nonzero power of two stored as u32, got type {vtype} value {v}")
            alignment = v
        keys.append(key)
    infos = []
    names = set()
    for i in range(n_tensors):
        name = r.string(f"tensor #{i} name", limit=1 << 16)
        if len(name.encode()) > MAX_NAME:
            r.fail(f"tensor name {name[:40]!r}… is longer than {MAX_NAME} bytes")
        if name in names:
            r.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(f"{name} dimension count")
        if not 1 <= n_dims <= 4:
            r.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        dims = tuple(r.u64(f"{name} dimension") for _ in range(n_dims))
        t = r.u32(f"{name} type")
        off = r.u64(f"{name} offset")
        if any(d == 0 for d in dims):
            r.fail(f"tensor {name!r} has a zero dimension {dims}")
        n = 1
        for d in dims:
            if d > MAX_DIM:
                r.fail(f"tensor {name!r}: dimension {d} is too large")
            n *= d
            if n > MAX_DIM:
                r.fail(f"tensor {name!r}: element count {dims} overflows")
        if t not in GGML_TYPES:
            r.fail(f"tensor {name!r} has unknown type {t}")
        tname, block, tsize = GGML_TYPES[t]
        if dims[0] % block:
            r.fail(f"tensor {name!r}: row of {dims[0]} elements is not a whole number of {tname} blocks of {block}")
        if off % alignment:
            r.fail(f"tensor {name!r}: offset {off} is not aligned to {alignment}")
        infos.append((name, dims, t, off, n // block * tsize))
    data_start = (r.pos + alignment - 1) // alignment * alignment
    tensors = []
    end_prev, prev = 0, None
    for name, dims, t, off, nbytes in sorted(infos, key=lambda x: x[3]):
        start = data_start + off
        if start + nbytes > size:
            raise GGUFInvalid(f"{path}: tensor {name!r} ends at byte {start + nbytes}, past the end of the "
                              f"{size}-byte file (truncated?)")
        if start < end_prev:
            raise GGUFInvalid(f"{path}: tensors {prev!r} and {name!r} overlap")
        end_prev, prev = start + nbytes, name
        tensors.append(TensorInfo(name, dims, t, start, nbytes))
    order = {n[0]: i for i, n in enumerate(infos)}
    tensors.sort(key=lambda ti: order[ti.name])
    return Header(version, alignment, data_start, tuple(tensors), tuple(keys))
