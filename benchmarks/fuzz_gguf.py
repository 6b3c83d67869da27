"""Value fuzzer for the GGUF validator (qes_edge.gguf.check): mutate the VALUES of the default
model's metadata (and a few tensor-table fields), run the validator on the mutated header, and
check that it only ever raises GGUFInvalid and that every file it accepts satisfies the
hyperparameter invariants llama.cpp relies on.

    python benchmarks/fuzz_gguf.py [--cases N] [--seed S] [--full]

Each case is derived from its own seed (seed + i), so a failure is reproduced from the printed
seed alone.  No file is written and llama.cpp is never loaded: the mutated header is built in
memory and handed to the validator together with the size the file would have.

By default the cases run on a *reduced* copy of the real header: the tokenizer tables are cut
to their first REDUCED_TOKENS entries and token_embd.weight's row count with them (every other
key and tensor is the real model's); the full header spends ~all its parse time walking 100k
tokenizer strings, which is the same code for every case.  --full fuzzes the unreduced header.

Prints cases/s, accepted/refused counts, and every non-GGUFInvalid exception with its seed;
exits 1 if there was one (or if an accepted file breaks an invariant)."""

from __future__ import annotations

import argparse
import math
import random
import struct
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

if __name__ == "__main__":  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qes_edge.gguf.check import (MAX_CONTEXT_LENGTH, MAX_LAYERS, GGUFInvalid,  # noqa: E402
                                 _check)

REDUCED_TOKENS = 256
FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
SIZE = {k: struct.calcsize("<" + v) for k, v in FMT.items()}
U32, I32, F32, STR, ARR = 4, 5, 6, 8, 9
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
FLOAT_TYPES = (6, 12)


@dataclass(frozen=True)
class Arr:
    """An array value: element type, count, and either decoded items or the raw element bytes."""
    etype: int
    count: int
    items: tuple | None = None      # numeric arrays / short string arrays, decoded
    raw: bytes | None = None        # long arrays kept as their encoded bytes


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple
    ttype: int
    offset: int


@dataclass(frozen=True)
class Model:
    """A GGUF header as the fuzzer sees it: the KV entries in order, the tensor table, and the
    size of the tensor data region (which follows the header, aligned)."""
    version: int
    kvs: tuple            # ((key, vtype, value), ...)
    tensors: tuple        # (Tensor, ...)
    data_len: int
    alignment: int = 32

    def get(self, key):
        for k, t, v in self.kvs:
            if k == key:
                return t, v
        return None

    def set(self, key, vtype, value) -> "Model":
        kvs = tuple((k, vtype, value) if k == key else (k, t, v) for k, t, v in self.kvs)
        return replace(self, kvs=kvs)


# -- an independent minimal parser (it reads only the trusted, real model) ------------------------
def _read_string(b, pos):
    n = struct.unpack_from("<Q", b, pos)[0]
    return bytes(b[pos + 8:pos + 8 + n]).decode(), pos + 8 + n


def parse(b, file_size: int) -> tuple[Model, dict]:
    """The Model of a real file's header, and key -> (absolute value offset, value size) for the
    scalar values (to edit a real copy in place)."""
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    pos = 24
    kvs, where = [], {}
    alignment = 32
    for _ in range(n_kv):
        key, pos = _read_string(b, pos)
        vtype = struct.unpack_from("<I", b, pos)[0]
        pos += 4
        if vtype == STR:
            v, pos = _read_string(b, pos)
        elif vtype == ARR:
            etype, count = struct.unpack_from("<IQ", b, pos)
            pos += 12
            start = pos
            if etype == STR:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", b, pos)[0]
            else:
                pos += count * SIZE[etype]
            raw = bytes(b[start:pos])
            items = None
            if etype != STR and count <= 4096:
                items = struct.unpack(f"<{count}{FMT[etype]}", raw)
            v = Arr(etype, count, items, raw)
        else:
            where[key] = (pos, SIZE[vtype])
            v = struct.unpack_from("<" + FMT[vtype], b, pos)[0]
            pos += SIZE[vtype]
        if key == "general.alignment":
            alignment = v
        kvs.append((key, vtype, v))
    tensors = []
    for _ in range(n_t):
        name, pos = _read_string(b, pos)
        nd = struct.unpack_from("<I", b, pos)[0]
        dims = struct.unpack_from(f"<{nd}Q", b, pos + 4)
        pos += 4 + 8 * nd
        ttype, off = struct.unpack_from("<IQ", b, pos)
        pos += 12
        tensors.append(Tensor(name, dims, ttype, off))
    data_start = (pos + alignment - 1) // alignment * alignment
    return Model(version, tuple(kvs), tuple(tensors), file_size - data_start, alignment), where


def _string_items(raw: bytes, count: int) -> list[bytes]:
    out, pos = [], 0
    for _ in range(count):
        n = struct.unpack_from("<Q", raw, pos)[0]
        out.append(raw[pos:pos + 8 + n])
        pos += 8 + n
    return out


def reduce(m: Model, n_tokens: int = REDUCED_TOKENS) -> Model:
    """The same header with the tokenizer tables cut to n_tokens entries (merges to n_tokens too),
    token_embd.weight to n_tokens rows and {arch}.vocab_size to n_tokens: every other
    hyperparameter is the real model's."""
    kvs = []
    for k, t, v in m.kvs:
        if t == ARR and k.startswith("tokenizer.ggml.") and v.count > n_tokens:
            if v.etype == STR:
                raw = b"".join(_string_items(v.raw, n_tokens))
                v = Arr(STR, n_tokens, None, raw)
            else:
                raw = v.raw[:n_tokens * SIZE[v.etype]]
                v = Arr(v.etype, n_tokens, struct.unpack(f"<{n_tokens}{FMT[v.etype]}", raw), raw)
        elif k.endswith(".vocab_size") and t == U32:
            v = n_tokens
        kvs.append((k, t, v))
    tensors = tuple(replace(t, dims=(t.dims[0], n_tokens)) if t.name == "token_embd.weight" else t
                    for t in m.tensors)
    return replace(m, kvs=tuple(kvs), tensors=tensors)


# -- serialisation ------------------------------------------------------------------------------
def _s(x: str | bytes) -> bytes:
    b = x.encode("utf-8", "surrogatepass") if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, v) -> bytes:
    if vtype == STR:
        return _s(v)
    if vtype == ARR:
        if v.raw is not None:
            body = v.raw
        elif v.etype == STR:
            body = b"".join(_s(x) for x in v.items)
        else:
            body = struct.pack(f"<{len(v.items)}{FMT[v.etype]}", *v.items)
        return struct.pack("<IQ", v.etype, v.count) + body
    return struct.pack("<" + FMT[vtype], v)


_ENCODED: dict = {}  # id(entry) -> (entry, bytes): the base model's entries are encoded once


def _encoded(entry, encode) -> bytes:
    hit = _ENCODED.get(id(entry))
    if hit is not None and hit[0] is entry:
        return hit[1]
    b = encode(entry)
    if len(_ENCODED) > 100_000:
        _ENCODED.clear()
    _ENCODED[id(entry)] = (entry, b)
    return b


def _encode_kv(kv) -> bytes:
    k, t, v = kv
    return _s(k) + struct.pack("<I", t) + encode_value(t, v)


def _encode_tensor(t: Tensor) -> bytes:
    return (_s(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
            + struct.pack("<IQ", t.ttype, t.offset))


def serialize(m: Model) -> tuple[bytes, int]:
    """The header bytes (padded to the alignment) and the size the whole file would have."""
    parts = [b"GGUF", struct.pack("<IQQ", m.version, len(m.tensors), len(m.kvs))]
    parts += [_encoded(kv, _encode_kv) for kv in m.kvs]
    parts += [_encoded(t, _encode_tensor) for t in m.tensors]
    head = b"".join(parts)
    head += b"\0" * (-len(head) % m.alignment)
    return head, len(head) + m.data_len


# -- mutations ----------------------------------------------------------------------------------
SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 513, 512, 511, 1 << 20,
                (1 << 24) + 1, 1 << 24]
SPECIAL_FLOATS = [math.nan, -math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, 1e-45, 1e-38, 1e-30, 1e-6, 0.5, 1.0,
                  2.0, 1e4, 1e30, 3.4e38, 1e300, -1e-5]


def _fit_int(vtype, x):
    bits = SIZE[vtype] * 8
    x &= (1 << bits) - 1
    if vtype in (1, 3, 5, 11) and x >= 1 << (bits - 1):
        x -= 1 << bits
    return x


def _fit_float(vtype, x):
    if vtype == 6:
        try:
            struct.pack("<f", x)
        except OverflowError:
            return math.copysign(math.inf, x)
    return x


def _random_int(rng, old):
    r = rng.random()
    if r < 0.5:
        return rng.choice(SPECIAL_INTS)
    if r < 0.7 and isinstance(old, int):
        return old + rng.choice([-1, 1, -2, 2, old, -old, 64, -64])
    if r < 0.85 and isinstance(old, int):
        return old * rng.choice([2, 3, 4]) if rng.random() < 0.5 else old // rng.choice([2, 3, 4, 5])
    return rng.getrandbits(rng.choice([8, 16, 32, 64]))


def _random_float(rng, old):
    r = rng.random()
    if r < 0.6:
        return rng.choice(SPECIAL_FLOATS)
    if r < 0.8 and isinstance(old, float):
        return old * rng.choice([-1.0, 0.5, 2.0, 1e10, 1e-10])
    return struct.unpack("<f", struct.pack("<I", rng.getrandbits(32)))[0]


def _value_of_type(rng, vtype, old, n_layer):
    """A new value for a key of type vtype (old may be of another type)."""
    if vtype in INT_TYPES:
        if isinstance(old, float) and math.isfinite(old) and rng.random() < 0.3:
            return _fit_int(vtype, int(old))
        return _fit_int(vtype, _random_int(rng, old if isinstance(old, int) and not isinstance(old, bool) else 1))
    if vtype in FLOAT_TYPES:
        if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.3:
            return _fit_float(vtype, float(old))
        return _fit_float(vtype, _random_float(rng, old if isinstance(old, float) else 1.0))
    if vtype == 7:
        return rng.random() < 0.5
    if vtype == STR:
        return rng.choice(["", "0", "1e-5", "nan", str(old), "llama", "gemma3", "yarn", "linear", "bogus",
                           "x" * 300, "\u00e9\u4e2d"])
    # an array: per-layer shaped (n_layer elements) or not
    etype = rng.choice([U32, I32, F32, U32, STR, 10, 7])
    count = rng.choice([n_layer, n_layer, 0, 1, n_layer + 1, max(n_layer - 1, 0)])
    base = old if isinstance(old, (int, float)) and not isinstance(old, bool) else 1
    items = []
    for _ in range(count):
        if etype == STR:
            items.append(str(base))
        elif etype == 7:
            items.append(rng.random() < 0.5)
        elif rng.random() < 0.9:
            items.append(_fit_int(etype, int(base)) if etype != F32 and math.isfinite(base) else
                         (_fit_float(etype, float(base)) if etype == F32 else 0))
        else:
            items.append(_value_of_type(rng, etype, base, n_layer))
    return Arr(etype, count, tuple(items))


def _n_layer(m: Model) -> int:
    arch = m.get("general.architecture")
    bc = m.get(f"{arch[1]}.block_count") if arch and arch[0] == STR else None
    return bc[1] if bc and bc[0] == U32 and bc[1] <= MAX_LAYERS else 30


#: tokenizer keys llama.cpp or llama-cpp-python use as an index or a per-token table
TOKENIZER_INDEX_KEYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")

#: mutations found by attacks from outside, run before the random cases: each passed the
#: validator once and then killed `train` (SIGABRT in llama-cpp-python's vocabulary lookup)
SEED_CASES = (
    ("tokenizer.ggml.bos_token_id", U32, 2**31 - 1),
    ("tokenizer.ggml.bos_token_id", U32, 2**32 - 1),
    ("tokenizer.ggml.eos_token_id", U32, 2**31 - 1),
    ("tokenizer.ggml.eos_token_id", U32, 2**32 - 1),
)


def seeded(base: Model) -> list[Model]:
    """The SEED_CASES applied to base (those whose key base holds)."""
    return [base.set(k, t, v) for k, t, v in SEED_CASES if base.get(k) is not None]


def mutate(m: Model, rng: random.Random) -> Model:
    """One to three random mutations of key values, key types, array lengths or tensor fields."""
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        n_layer = _n_layer(m)
        keys = [k for k, _, _ in m.kvs]
        hot = [k for k in keys if not k.startswith(("general.", "tokenizer.")) or k in
               ("general.architecture", "general.alignment", "tokenizer.ggml.tokens") or k in TOKENIZER_INDEX_KEYS
               or k.startswith("tokenizer.ggml.") and k.endswith("_token_id")]
        op = rng.random()
        if not keys or op >= 0.87 and not m.tensors:
            continue
        key = rng.choice(hot if hot and rng.random() < 0.9 else keys)
        vtype, old = m.get(key)
        if op < 0.55:                                   # new value, same type
            if vtype == ARR:
                if old.etype == STR:                    # token list: change its length
                    items = _string_items(old.raw, old.count) if old.raw is not None else [_s(x) for x in old.items]
                    d = rng.choice([-1, 1, -old.count, 7, -7, 1000])
                    items = items[:old.count + d] if d < 0 else items + [_s(f"tok{i}") for i in range(d)]
                    m = m.set(key, ARR, Arr(STR, len(items), None, b"".join(items)))
                elif old.items is not None and old.count:
                    items = list(old.items)
                    i = rng.randrange(len(items))
                    items[i] = _value_of_type(rng, old.etype, items[i], n_layer)
                    m = m.set(key, ARR, Arr(old.etype, old.count, tuple(items)))
                continue
            m = m.set(key, vtype, _value_of_type(rng, vtype, old, n_layer))
        elif op < 0.8:                                  # change the type
            new_t = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, U32, F32, ARR])
            m = m.set(key, new_t, _value_of_type(rng, new_t, old, n_layer))
        elif op < 0.87:                                 # drop the key
            m = replace(m, kvs=tuple(kv for kv in m.kvs if kv[0] != key))
        else:                                           # the tensor table
            ts = list(m.tensors)
            i = rng.randrange(len(ts))
            if rng.random() < 0.4:
                i = next(j for j, t in enumerate(ts) if t.name == "token_embd.weight") if any(
                    t.name == "token_embd.weight" for t in ts) else i
            t = ts[i]
            r = rng.random()
            if r < 0.4:
                dims = list(t.dims)
                d = rng.randrange(len(dims))
                dims[d] = max(1, dims[d] + rng.choice([-1, 1, -32, 32, dims[d], -(dims[d] // 2)]))
                ts[i] = replace(t, dims=tuple(dims))
            elif r < 0.8 and t.name.startswith("blk."):  # move a tensor to another block number
                rest = t.name.split(".", 2)[2]
                n = rng.choice([n_layer, n_layer + 1, 0, 2**31, 511, 512])
                name = f"blk.{n}.{rest}"
                if all(x.name != name for x in ts):
                    ts[i] = replace(t, name=name)
            else:
                del ts[i]
            m = replace(m, tensors=tuple(ts))
    return m


# -- what every accepted file must satisfy (checked from the fuzzer's own model of the file) ----
def invariants(m: Model) -> list[str]:
    """The ways m breaks the hyperparameter invariants (empty if none)."""
    errs = []

    def val(key, want):
        kv = m.get(key)
        if kv is None:
            return None
        if kv[0] not in want:
            errs.append(f"{key} has type {kv[0]}")
            return None
        return kv[1]

    arch = val("general.architecture", (STR,))
    if not arch:
        return errs + ["no architecture"]
    a = arch + "."
    groups = {int(t.name.split(".")[1]) for t in m.tensors if t.name.startswith("blk.")}
    n_layer = val(a + "block_count", (U32,))
    if n_layer is None or not 1 <= n_layer <= MAX_LAYERS or groups != set(range(n_layer)):
        errs.append(f"block_count {n_layer} vs groups {len(groups)}")
        n_layer = 0
    ctx = val(a + "context_length", (U32,))
    if ctx is None or not 1 <= ctx <= MAX_CONTEXT_LENGTH:
        errs.append(f"context_length {ctx}")
    n_embd = val(a + "embedding_length", (U32,))
    emb = next((t for t in m.tensors if t.name == "token_embd.weight"), None)
    if emb is None or n_embd != emb.dims[0]:
        errs.append(f"embedding_length {n_embd} vs token_embd {emb}")

    def layers(key):
        v = val(key, (U32, ARR))
        if isinstance(v, Arr):
            if v.etype not in (U32, I32) or v.count != n_layer:
                errs.append(f"{key} array {v.etype} x {v.count}")
                return None
            return [x & 0xFFFFFFFF for x in v.items]
        return None if v is None else [v] * n_layer

    heads = layers(a + "attention.head_count")
    kv = layers(a + "attention.head_count_kv") or heads
    if heads is None or any(h <= 0 or (n_embd and n_embd % h) for h in heads):
        errs.append(f"head_count {heads}")
    elif any(g <= 0 or h % g for h, g in zip(heads, kv)):
        errs.append(f"head_count_kv {kv}")
    for key in (a + "attention.layer_norm_rms_epsilon", a + "rope.freq_base"):
        v = val(key, (F32,))
        if key.endswith("epsilon") and v is None or v is not None and not (math.isfinite(v) and v > 0):
            errs.append(f"{key} {v}")
    tokens = val("tokenizer.ggml.tokens", (ARR,))
    if tokens is not None and (tokens.etype != STR or emb is None or tokens.count != emb.dims[1]):
        errs.append(f"tokens {tokens.count} vs token_embd {emb and emb.dims}")
    for k, t, v in m.kvs:
        if k.startswith(a) and t in FLOAT_TYPES and not math.isfinite(v):
            errs.append(f"{k} = {v}")
        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id") and (
                t != U32 or tokens is None or not 0 <= v < tokens.count):
            errs.append(f"{k} = {v} (type {t}) outside the vocabulary")
    for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = val(k, (ARR,))
        if v is not None and tokens is not None and (v.count < tokens.count or v.etype not in (F32, I32)):
            errs.append(f"{k}: {v.count} elements of type {v.etype} for {tokens.count} tokens")
    return errs


# -- the runner ---------------------------------------------------------------------------------
def load_base(full: bool = False, path=None) -> Model:
    from qes_edge.gguf.models import default_model_path
    path = Path(path or default_model_path())
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, 16 << 20))
    m, _ = parse(head, size)
    return m if full else reduce(m)


def run(base: Model, cases: int, seed: int = 0, path: str = "fuzz.gguf", report=None):
    """Run the SEED_CASES, then cases random mutations; returns (accepted, refused, failures) where failures lists
    (seed, description) for every non-GGUFInvalid exception or accepted file breaking an invariant."""
    accepted = refused = 0
    failures = []
    seeds = seeded(base)
    for i in range(-len(seeds), cases):
        s = seed + i if i >= 0 else f"seed-case {i + len(seeds)}"
        m = mutate(base, random.Random(s)) if i >= 0 else seeds[i]
        try:
            head, size = serialize(m)
        except (struct.error, OverflowError, UnicodeEncodeError):  # a value the fuzzer cannot encode
            continue
        try:
            _check(head, size, path)
        except GGUFInvalid:
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzer is looking for
            failures.append((s, "".join(traceback.format_exception_only(type(e), e)).strip()))
            if report:
                report(s, failures[-1][1] + "\n" + traceback.format_exc())
            continue
        accepted += 1
        bad = invariants(m)
        if bad:
            failures.append((s, "accepted but " + "; ".join(bad)))
            if report:
                report(s, failures[-1][1])
    return accepted, refused, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the first case (case i uses seed + i)")
    ap.add_argument("--full", action="store_true", help="fuzz the full header, tokenizer tables included (slow)")
    args = ap.parse_args(argv)
    base = load_base(args.full)
    print(f"fuzzing {args.cases} cases from seed {args.seed} on the {'full' if args.full else 'reduced'} "
          f"default-model header ({len(base.kvs)} keys, {len(base.tensors)} tensors)", flush=True)

    def report(s, text):
        print(f"FAIL seed {s}: {text}", flush=True)

    t0 = time.perf_counter()
    accepted, refused, failures = run(base, args.cases, args.seed, report=report)
    dt = time.perf_counter() - t0
    n = args.cases + len(seeded(base))
    print(f"{n} cases ({n - args.cases} seed cases) in {dt:.1f} s ({n / dt:.0f} cases/s): {accepted} accepted, "
          f"{refused} refused, {n - accepted - refused} not encodable, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
