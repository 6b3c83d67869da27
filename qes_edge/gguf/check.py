"""Validate a GGUF file's header with our own strict parser, before anything else reads it.

GGUF files are an attack surface: llama.cpp's loader has had integer-overflow and out-of-bounds
bugs (dimension products that wrap, ne == 0, unchecked array element types, offsets past the
end).  This reader checks every count against the bytes that remain, every size product
against overflow, every tensor's data range against the file size, and refuses what llama.cpp
or the `gguf` package would misread, with a message that says what is wrong and where.
It then checks the hyperparameter values llama.cpp will trust (check_hparams: block count,
heads, norm epsilon, rope, context length, vocabulary), since a hostile value there aborts the
process inside llama.cpp or computes NaN.  It reads only the header (metadata and tensor
table), never the tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from qes_edge.native.types import GGML_TYPES

MAGIC = b"GGUF"
MAX_COUNT = 1 << 24          # tensors or metadata entries: far beyond any real model
MAX_STRING = 1 << 24         # one metadata string
MAX_NAME = 63                # GGML_MAX_NAME - 1
MAX_DIM = 1 << 62
DEFAULT_ALIGNMENT = 32
MAX_DECODED_ARRAY = 4096     # numeric arrays up to this length are decoded (per-layer hyperparameters)
STRING_CHUNK = 1024          # strings of an array checked for UTF-8 together

# GGUF metadata value types: id -> (name, fixed size or None)
VALUE_TYPES = {0: ("u8", 1), 1: ("i8", 1), 2: ("u16", 2), 3: ("i16", 2), 4: ("u32", 4), 5: ("i32", 4),
               6: ("f32", 4), 7: ("bool", 1), 8: ("string", None), 9: ("array", None), 10: ("u64", 8),
               11: ("i64", 8), 12: ("f64", 8)}
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_U64 = struct.Struct("<Q")
_U32S = struct.Struct("<I")
_TENSOR_TAIL = struct.Struct("<IQ")  # a tensor's type and offset
_DIMS = {n: struct.Struct(f"<{n}Q") for n in range(1, 5)}


class GGUFInvalid(ValueError):
    """The file is not a GGUF that qes-edge will hand to llama.cpp."""


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array: its element type id, its length, and its elements when they were decoded
    (numeric arrays of at most MAX_DECODED_ARRAY elements; None for strings and longer arrays)."""
    etype: int
    count: int
    items: tuple | None = None
    longest: int = 0  # an array of strings: the byte length of its longest string

    def __str__(self) -> str:
        return f"array of {self.count} {VALUE_TYPES[self.etype][0]}"


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
    metadata: dict = field(default_factory=dict, compare=False)  # key -> decoded value
    value_types: dict = field(default_factory=dict, compare=False)  # key -> GGUF value type id


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

    def _unpack(self, st: struct.Struct, what: str, suffix: str = ""):
        # the hot path of the parser: one bounds check, no slice, the message built only on failure
        pos = self.pos
        if pos + st.size > len(self.data):
            self.fail(f"truncated: {what}{suffix} needs {st.size} bytes, {len(self.data) - pos} remain")
        self.pos = pos + st.size
        return st.unpack_from(self.data, pos)

    def u32(self, what, suffix=""):
        return self._unpack(_U32S, what, suffix)[0]

    def u64(self, what, suffix=""):
        return self._unpack(_U64, what, suffix)[0]

    def string(self, what, limit=MAX_STRING) -> str:
        n = self.u64(what, " length")
        if n > limit:
            self.fail(f"{what} is {n} bytes long (limit {limit})")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str):
        """Decode one metadata value: int, float, bool or str for a scalar, an ArrayValue for an array."""
        if vtype not in VALUE_TYPES:
            self.fail(f"{what}: unknown value type {vtype}")
        name, size = VALUE_TYPES[vtype]
        if name == "string":
            return self.string(what)
        if name == "array":
            etype = self.u32(what, " element type")
            if etype not in VALUE_TYPES:
                self.fail(f"{what}: array of unknown element type {etype}")
            if VALUE_TYPES[etype][0] == "array":
                self.fail(f"{what}: arrays of arrays are not supported")
            count = self.u64(what, " element count")
            esize = VALUE_TYPES[etype][1]
            remain = len(self.data) - self.pos
            if count > MAX_COUNT * 16 or count * (esize or 8) > remain:
                self.fail(f"{what}: array of {count} elements does not fit in the {remain} bytes that remain")
            if esize:
                raw = self.take(count * esize, what)
                items = None
                if count <= MAX_DECODED_ARRAY:  # per-layer arrays; the big tokenizer tables are only sized
                    items = struct.unpack(f"<{count}{_FORMATS[etype]}", raw)
                    if VALUE_TYPES[etype][0] == "bool":
                        items = tuple(bool(x) for x in items)
                return ArrayValue(etype, count, items)
            return ArrayValue(etype, count, None, self._strings(count, what))
        raw = self.take(size, what)
        v = struct.unpack("<" + _FORMATS[vtype], raw)[0]
        return bool(v) if name == "bool" else v

    def _strings(self, count: int, what: str) -> int:
        """Walk an array of count strings (the tokenizer's 50k-250k tokens: this loop is the
        validator's hot path), checking each length and that every string is UTF-8.

        The strings are checked STRING_CHUNK at a time: the bytes of a whole vocabulary at once
        (a list of 50k+ objects, then their join and its decoding, several MB) would be freed
        memory that the allocator keeps, in every process that opens a model."""
        data, pos, end = self.data, self.pos, len(self.data)
        unpack = _U64.unpack_from
        pieces, first, longest = [], 0, 0
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.fail(f"truncated: {what}[{i}] length needs 8 bytes, {end - pos} remain")
            n = unpack(data, pos)[0]
            pos += 8
            if n > MAX_STRING:
                self.pos = pos
                self.fail(f"{what}[{i}] is {n} bytes long (limit {MAX_STRING})")
            if pos + n > end:
                self.pos = pos
                self.fail(f"truncated: {what}[{i}] needs {n} bytes, {end - pos} remain")
            pieces.append(data[pos:pos + n])
            pos += n
            if n > longest:
                longest = n
            if len(pieces) == STRING_CHUNK:
                self._utf8(pieces, first, what)
                pieces, first = [], i + 1
        self._utf8(pieces, first, what)
        self.pos = pos
        return longest

    def _utf8(self, pieces: list, first: int, what: str) -> None:
        """Every one of pieces (the strings first, first + 1, ... of the array) is UTF-8."""
        # joined by an ASCII byte (never part of a multi-byte sequence), the strings are valid
        # UTF-8 together exactly when each one is
        try:
            b"\n".join(pieces).decode("utf-8")
        except UnicodeDecodeError:
            for i, p in enumerate(pieces):
                try:
                    p.decode("utf-8")
                except UnicodeDecodeError:
                    self.fail(f"{what}[{first + i}] is not UTF-8")


def arch_value(metadata: dict, key: str, default=None):
    """The architecture's hyperparameter `{general.architecture}.{key}` from a header's metadata
    (a per-layer array read as its first element), or default."""
    v = metadata.get(f"{metadata.get('general.architecture', 'llama')}.{key}", default)
    return v[0] if isinstance(v, (list, tuple)) and v else v


def prompt_byte_limit(header: Header, n_ctx: int) -> int | None:
    """The most bytes of text that can fit in n_ctx tokens of this model's vocabulary (None when
    the file has no token list): no token decodes to more bytes than the longest entry of
    tokenizer.ggml.tokens (a byte-level BPE entry maps each character to at most one byte, a
    SentencePiece "▁" or "<0xNN>" to one; special tokens are their text), plus one for a space
    a tokenizer may add.  A text longer than this cannot be a prompt of n_ctx tokens, and is
    refused before it is tokenized."""
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, ArrayValue) or not tokens.longest:
        return None
    return n_ctx * (tokens.longest + 1)


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
    meta, vtypes = {}, {}
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}", limit=65535)
        vtype = r.u32(f"type of {key!r}")
        v = r.value(vtype, f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != 4 or not v or v & (v - 1):
                r.fail(f"general.alignment must be a nonzero power of two stored as u32, got type {vtype} value {v}")
            alignment = v
        if key in meta:
            r.fail(f"metadata key {key!r} appears twice")
        keys.append(key)
        meta[key], vtypes[key] = v, vtype
    infos = []
    names = set()
    data, end = r.data, len(r.data)
    for i in range(n_tensors):
        # fast path for a well-formed record (one bounds check per field group, no messages built);
        # anything unusual is re-read by the checked path below, which says what is wrong
        pos, rec = r.pos, None
        if pos + 8 <= end:
            ln = _U64.unpack_from(data, pos)[0]
            p = pos + 8 + ln
            if ln <= MAX_NAME and p + 4 <= end:
                nd = _U32S.unpack_from(data, p)[0]
                if 1 <= nd <= 4 and p + 16 + 8 * nd <= end:
                    try:
                        name = data[pos + 8:p].decode("utf-8")
                    except UnicodeDecodeError:
                        name = None
                    dims = _DIMS[nd].unpack_from(data, p + 4)
                    t, off = _TENSOR_TAIL.unpack_from(data, p + 4 + 8 * nd)
                    n = math.prod(dims)
                    if name is not None and name not in names and 0 < n <= MAX_DIM and 0 not in dims \
                            and t in GGML_TYPES and not off % alignment:
                        tname, block, tsize = GGML_TYPES[t]
                        if not dims[0] % block:
                            rec = (name, dims, t, off, n // block * tsize)
                            r.pos = p + 16 + 8 * nd
        if rec is not None:
            names.add(rec[0])
            infos.append(rec)
            continue
        name = r.string(f"tensor #{i} name", limit=1 << 16)
        if len(name.encode()) > MAX_NAME:
            r.fail(f"tensor name {name[:40]!r}… is longer than {MAX_NAME} bytes")
        if name in names:
            r.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.u32(name, " dimension count")
        if not 1 <= n_dims <= 4:
            r.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        dims = r._unpack(_DIMS[n_dims], name, " dimensions")
        t, off = r._unpack(_TENSOR_TAIL, name, " type and offset")
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
    header = Header(version, alignment, data_start, tuple(tensors), tuple(keys), meta, vtypes)
    check_hparams(header, path)
    check_tokenizer(header, path)
    return header


# -- hyperparameters ---------------------------------------------------------------------------
# llama.cpp trusts the values of the keys it reads: a block count of 0 or above its 512-layer
# arrays, a negative or NaN norm epsilon, or an expert count above its limit end the process in a
# GGML_ASSERT (SIGABRT, no Python exception); a NaN, zero or negative rope base computes NaN
# logits; a context length near 2^32 wraps to -1 in llama-cpp-python or takes minutes to load.

#: LLAMA_MAX_LAYERS in llama.cpp (llama-hparams.h): per-layer arrays have this many slots and
#: load_hparams asserts n_layer <= it.
MAX_LAYERS = 512
#: LLAMA_MAX_EXPERTS in llama.cpp (llama-hparams.h), also asserted in load_hparams.
MAX_EXPERTS = 1024
#: Largest training context accepted: 2^24 = 16M tokens is above every released model (the
#: longest, Llama 4 Scout, declares 10M); 2^32-1 wraps to -1 in llama-cpp-python and 2^31-1 takes
#: minutes to load, so a cap is needed and this one leaves real models room.
MAX_CONTEXT_LENGTH = 1 << 24
#: Largest embedding / feed-forward width / head dimension / vocabulary accepted: far above any
#: real model (embedding widths are <= 2^15, vocabularies <= 2^18), far below overflow.
MAX_WIDTH = 1 << 22
#: A norm epsilon is a small positive number (1e-6 .. 1e-5 in real models).
MAX_NORM_EPS = 1.0
#: Rope frequency base: below 1 the rotary frequencies grow with the dimension and overflow to
#: inf (NaN logits) for tiny values; real bases are 1e4 .. 1e7.
MIN_ROPE_BASE = 1.0
#: Rope scaling factor (llama.cpp uses 1/factor as the frequency scale; 0 means none): real
#: factors are 1 .. 64; a tiny one makes the frequency scale overflow.
ROPE_FACTOR_RANGE = (1e-3, 1e6)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama.cpp asserts on any other
#: Architectures where llama.cpp needs attention heads and an RMS norm epsilon (qes-edge's
#: models: SmolLM2 is llama, Gemma 3 is gemma3); elsewhere those keys are checked when present.
ATTENTION_ARCHS = frozenset({"llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "mistral3"})

_U32, _I32, _F32, _STR = 4, 5, 6, 8
_TYPE_NAMES = {k: v[0] for k, v in VALUE_TYPES.items()}


def _show(v) -> str:
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else repr(v[:40]) + "…"
    return str(v)


def _refuser(path, meta: dict):
    """bad(key, why): refuse the file, naming the key and its value ("path: key = value, why")."""
    def bad(key, why):
        raise GGUFInvalid(f"{path}: {key} = {_show(meta[key])}, {why}")
    return bad


def check_hparams(header: Header, path) -> None:
    """Check the hyperparameters llama.cpp will read for the file's architecture.

    general.architecture must be a string.  For every architecture the keys llama.cpp's
    load_hparams reads for all of them are checked: {arch}.block_count (required; equal to the
    number of blk.N. tensor groups, numbered 0..count-1, at most MAX_LAYERS),
    {arch}.context_length (required; 1..MAX_CONTEXT_LENGTH), {arch}.embedding_length (required;
    equal to token_embd.weight's row width), and when present feed_forward_length, attention
    head_count / head_count_kv (a u32, or a u32/i32 array with one element per block: every
    element is checked), key_length / value_length, layer_norm_rms_epsilon / layer_norm_epsilon,
    rope freq_base / scaling factor / scaling type / dimension_count, vocab_size, the expert counts,
    nextn_predict_layers, and tokenizer.ggml.tokens (its length equals token_embd.weight's rows).
    Every key must have the type llama.cpp reads (a float stored as a string is refused), and every
    float under {arch}. must be finite.  For ATTENTION_ARCHS head_count and the RMS epsilon are
    required too.  An architecture llama.cpp does not know passes these generic checks and is
    then refused by llama.cpp itself with a clean error ("unknown model architecture").
    """
    meta, types = header.metadata, header.value_types

    bad = _refuser(path, meta)

    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFInvalid(f"{path}: no general.architecture key (llama.cpp cannot load the file without one)")
    if types["general.architecture"] != _STR or not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,63}", arch):
        bad("general.architecture", "but it must be an architecture name (a string of up to 64 a-z, 0-9, _ or -)")

    def typed(key, expect, required=False, arrays=False):
        """The value of key (None if absent), refused unless its type is expect; with arrays, a
        u32/i32 array is accepted too."""
        if key not in meta:
            if required:
                raise GGUFInvalid(f"{path}: {key} is missing (llama.cpp requires it for {arch!r})")
            return None
        v, t = meta[key], types[key]
        if t == expect:
            return v
        if arrays and t == 9 and v.etype in (_U32, _I32):
            return v
        want = _TYPE_NAMES[expect] + (" or an array of u32/i32 (one per block)" if arrays else "")
        bad(key, f"but it is stored as {_TYPE_NAMES[t] if t != 9 else str(v)}; llama.cpp reads {want}")

    def count(key, lo, hi, required=False, why=""):
        v = typed(key, _U32, required)
        if v is not None and not lo <= v <= hi:
            bad(key, why or f"but it must lie in {lo}..{hi}")
        return v

    def real(key, lo, hi, required=False, zero_ok=False, why=None):
        v = typed(key, _F32, required)
        if v is None:
            return None
        if v != v or v in (float("inf"), float("-inf")):
            bad(key, "but it must be a finite number")
        if zero_ok and v == 0:
            return v
        if not lo <= v <= hi:
            bad(key, why or f"but it must lie in [{lo:g}, {hi:g}]")
        return v

    a = arch + "."
    # every float hyperparameter must be finite, whatever llama.cpp makes of it
    for key, t in types.items():
        if not key.startswith(a):
            continue
        v = meta[key]
        if t in (6, 12) and not abs(v) < float("inf"):
            bad(key, "but it must be a finite number")
        if t == 9 and v.etype in (6, 12) and v.items is not None and not all(abs(x) < float("inf") for x in v.items):
            bad(key, "but every element must be a finite number")

    # blocks: the count must match the blk.N. groups the file holds
    groups = set()
    for t in header.tensors:
        if t.name.startswith("blk."):
            n = t.name.split(".", 2)[1]
            if not n.isdigit() or not n.isascii() or str(int(n)) != n or "." not in t.name[4:]:
                raise GGUFInvalid(f"{path}: tensor {t.name!r} has a malformed block number (blk.N. expected)")
            groups.add(int(n))
    n_layer = count(a + "block_count", 0, 2**32, required=True)
    if n_layer != len(groups):
        bad(a + "block_count", f"but the file holds {len(groups)} blk.N tensor groups")
    if n_layer < 1 or n_layer > MAX_LAYERS:
        bad(a + "block_count", f"but it must lie in 1..{MAX_LAYERS} (llama.cpp's layer limit)")
    if groups != set(range(n_layer)):
        missing = min(set(range(n_layer)) - groups)
        bad(a + "block_count", f"but the blk.N tensor groups are not numbered 0..{n_layer - 1} (blk.{missing} is missing)")
    count(a + "nextn_predict_layers", 0, n_layer, why=f"but it must be at most the block count {n_layer}")

    count(a + "context_length", 1, MAX_CONTEXT_LENGTH, required=True,
          why=f"but it must lie in 1..{MAX_CONTEXT_LENGTH} (MAX_CONTEXT_LENGTH)")
    count(a + "rope.scaling.original_context_length", 1, MAX_CONTEXT_LENGTH,
          why=f"but it must lie in 1..{MAX_CONTEXT_LENGTH} (MAX_CONTEXT_LENGTH)")
    n_embd = count(a + "embedding_length", 1, MAX_WIDTH, required=True)
    emb = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if emb is not None and (len(emb.dims) != 2 or emb.dims[0] != n_embd):
        raise GGUFInvalid(f"{path}: token_embd.weight has dimensions {list(emb.dims)}, but "
                          f"{a}embedding_length = {n_embd} (expected [{n_embd}, vocabulary])")

    # experts (load_hparams asserts each of these)
    n_expert = count(a + "expert_count", 0, MAX_EXPERTS,
                     why=f"but it must lie in 0..{MAX_EXPERTS} (llama.cpp's expert limit)") or 0
    used = _per_layer(a + "expert_used_count", n_layer, typed, bad, 0, MAX_EXPERTS)
    n_groups = count(a + "expert_group_count", 0, MAX_EXPERTS) or 0
    n_group_used = count(a + "expert_group_used_count", 0, MAX_EXPERTS) or 0
    if n_expert:
        if used is None or max(used) == 0:
            raise GGUFInvalid(f"{path}: {a}expert_count = {n_expert} but {a}expert_used_count is missing or 0")
        if max(used) > n_expert:
            bad(a + "expert_used_count", f"but at most {a}expert_count = {n_expert} experts can be used")
        if n_groups >= n_expert:
            bad(a + "expert_group_count", f"but it must be below the expert count {n_expert}")
        if n_groups > 1 and (n_expert % n_groups or not 0 < n_group_used < n_groups):
            bad(a + "expert_group_count", f"but it must divide the expert count {n_expert}, and "
                f"{a}expert_group_used_count ({n_group_used}) must lie in 1..{n_groups - 1}")
    else:
        if used is not None and max(used):
            bad(a + "expert_used_count", "but the file has no experts (expert_count is 0 or absent)")
        if n_groups:
            bad(a + "expert_group_count", "but the file has no experts (expert_count is 0 or absent)")

    ff_min = 0 if n_expert else 1
    _per_layer(a + "feed_forward_length", n_layer, typed, bad, ff_min, MAX_WIDTH)

    # attention heads
    heads = _per_layer(a + "attention.head_count", n_layer, typed, bad, 1, MAX_WIDTH,
                      required=arch in ATTENTION_ARCHS)
    kv = _per_layer(a + "attention.head_count_kv", n_layer, typed, bad, 1, MAX_WIDTH)
    k_len = count(a + "attention.key_length", 1, MAX_WIDTH)
    v_len = count(a + "attention.value_length", 1, MAX_WIDTH)
    head_dim = k_len
    if heads is not None:
        if k_len is None:
            for il, h in enumerate(heads):
                if n_embd % h:
                    bad(a + "attention.head_count", f"but {h} heads (block {il}) do not divide "
                        f"{a}embedding_length = {n_embd}")
            head_dim = n_embd // heads[0]
        if v_len is None and k_len is not None and n_embd % heads[0]:
            bad(a + "attention.head_count", f"but {heads[0]} heads do not divide {a}embedding_length = {n_embd} "
                f"and {a}attention.value_length is not given")
        if kv is not None:
            for il, (h, g) in enumerate(zip(heads, kv)):
                if h % g:
                    bad(a + "attention.head_count_kv", f"but {g} KV heads (block {il}) do not divide the {h} query heads")
    elif kv is not None:
        bad(a + "attention.head_count_kv", f"but {a}attention.head_count is missing")

    rot = typed(a + "rope.dimension_count", _U32)
    if rot is not None:
        if head_dim is None:
            bad(a + "rope.dimension_count", "but the file gives no attention heads to rotate")
        if not 1 <= rot <= head_dim or rot % 2:
            bad(a + "rope.dimension_count", f"but it must be even and in 1..{head_dim} (the head dimension)")
        if arch in ("llama", "deci", "falcon", "llama-embed") and rot != head_dim:
            bad(a + "rope.dimension_count", f"but {arch} requires it to equal the head dimension {head_dim}")

    # norms and rope
    eps_rms = real(a + "attention.layer_norm_rms_epsilon", 0.0, MAX_NORM_EPS, required=arch in ATTENTION_ARCHS)
    eps = real(a + "attention.layer_norm_epsilon", 0.0, MAX_NORM_EPS)
    for key, v in ((a + "attention.layer_norm_rms_epsilon", eps_rms), (a + "attention.layer_norm_epsilon", eps)):
        if v is not None and v <= 0:
            bad(key, "but a norm epsilon must be positive")
    for key in (a + "rope.freq_base", a + "rope.freq_base_swa"):
        real(key, MIN_ROPE_BASE, 3.0e38, why=f"but a rope frequency base must be at least {MIN_ROPE_BASE:g} "
             "(smaller ones make the rotary frequencies overflow)")
    for key in (a + "rope.scaling.factor", a + "rope.scale_linear"):
        real(key, *ROPE_FACTOR_RANGE, zero_ok=True)
    attn = real(a + "rope.scaling.attn_factor", 0.0, 1e6)
    if attn is not None and attn <= 0:
        bad(a + "rope.scaling.attn_factor", "but it must be positive")
    st = typed(a + "rope.scaling.type", _STR)
    if st is not None and st not in ROPE_SCALING_TYPES:
        bad(a + "rope.scaling.type", f"but llama.cpp knows only {', '.join(ROPE_SCALING_TYPES)}")

    # vocabulary and token embedding
    if arch in ATTENTION_ARCHS and emb is None:
        raise GGUFInvalid(f"{path}: no token_embd.weight tensor (llama.cpp requires it for {arch!r})")
    n_vocab = count(a + "vocab_size", 1, MAX_WIDTH)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not (types["tokenizer.ggml.tokens"] == 9 and tokens.etype == _STR):
        bad("tokenizer.ggml.tokens", "but it must be an array of strings")
    if emb is not None:
        rows = emb.dims[1]
        if tokens is not None and tokens.count != rows:
            bad("tokenizer.ggml.tokens", f"but token_embd.weight has {rows} rows (one per token)")
        if n_vocab is not None and n_vocab != rows:
            bad(a + "vocab_size", f"but token_embd.weight has {rows} rows (one per token)")
    elif tokens is not None and n_vocab is not None and tokens.count != n_vocab:
        bad(a + "vocab_size", f"but tokenizer.ggml.tokens holds {tokens.count} tokens")


# tokenizer arrays llama.cpp indexes with a token id: key -> element types it reads
_PER_TOKEN_ARRAYS = {"tokenizer.ggml.scores": (_F32, _I32), "tokenizer.ggml.token_type": (_I32,)}
_TOKENIZER_STRING_ARRAYS = ("tokenizer.ggml.merges",)


def check_tokenizer(header: Header, path) -> None:
    """Check the tokenizer keys that llama.cpp and llama-cpp-python use as indexes.

    Every special-token id the file names (``tokenizer.ggml.*_token_id``: bos, eos, eot, eom,
    unknown, padding, sep, cls, mask, the FIM ones, and any other) must be a u32 inside the
    vocabulary: llama.cpp ignores one that is not, but llama-cpp-python and our chat template
    look the id up in the vocabulary (``llama_token_get_text``), which aborts the process.
    The per-token tables (scores, token types) must have a type llama.cpp reads and at least one
    element per token, merges must be strings, and the suppressed-token list i32."""
    meta, types = header.metadata, header.value_types
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = tokens.count if isinstance(tokens, ArrayValue) else None

    bad = _refuser(path, meta)

    for key in sorted(k for k in meta if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")):
        v, t = meta[key], types[key]
        if t != _U32:
            bad(key, f"but it is stored as {_TYPE_NAMES[t] if t != 9 else str(v)}; llama.cpp reads a token id as u32")
        if n_tokens is None:
            bad(key, "but the file has no tokenizer.ggml.tokens to look it up in")
        if not 0 <= v < n_tokens:
            bad(key, f"but the vocabulary holds tokens 0..{n_tokens - 1} (tokenizer.ggml.tokens)")
    for key, etypes in _PER_TOKEN_ARRAYS.items():
        v = meta.get(key)
        if v is None:
            continue
        if not isinstance(v, ArrayValue) or v.etype not in etypes:
            want = " or ".join(f"an array of {_TYPE_NAMES[e]}" for e in etypes)
            bad(key, f"but llama.cpp reads {want}")
        if n_tokens is not None and v.count < n_tokens:
            bad(key, f"but it needs one element for each of the {n_tokens} tokens")
    for key in _TOKENIZER_STRING_ARRAYS:
        v = meta.get(key)
        if v is not None and not (isinstance(v, ArrayValue) and v.etype == _STR):
            bad(key, "but llama.cpp reads an array of strings")
    v = meta.get("tokenizer.ggml.suppress_tokens")
    if v is not None and not (isinstance(v, ArrayValue) and v.etype == _I32):
        bad("tokenizer.ggml.suppress_tokens", "but llama.cpp reads an array of i32")


def _per_layer(key, n_layer, typed, bad, lo, hi, required=False):
    """A key llama.cpp reads as one u32 for every block or an array with one element per block:
    the per-block values as a list (None if absent), each checked to lie in lo..hi."""
    v = typed(key, _U32, required, arrays=True)
    if v is None:
        return None
    if isinstance(v, ArrayValue):
        if v.count != n_layer:
            bad(key, f"but it must hold one element per block ({n_layer})")
        vals = list(v.items)
        if v.etype == _I32:
            vals = [x & 0xFFFFFFFF for x in vals]  # llama.cpp reads the elements as uint32
        for il, x in enumerate(vals):
            if not lo <= x <= hi:
                bad(key, f"but its element for block {il} is {x}, outside {lo}..{hi}")
        return vals
    if not lo <= v <= hi:
        bad(key, f"but it must lie in {lo}..{hi}")
    return [v] * n_layer
