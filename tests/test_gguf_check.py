"""Our own GGUF header validation: real files pass, hostile ones are refused by name, and a
fuzzer over mutated headers never gets anything but a clean GGUFInvalid."""

import struct

import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qes_edge.gguf.check import GGUFInvalid, check_gguf
from qes_edge.gguf.model import GGUFModel
from qes_edge.native.quant import QESError


def s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def kv_str(key, val):
    return s(key) + struct.pack("<I", 8) + s(val)


def kv_u32(key, val):
    return s(key) + struct.pack("<II", 4, val)


def kv_f32(key, val):
    return s(key) + struct.pack("<If", 6, val)


def kv_tokens(n):
    return s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, n) + b"".join(s(f"t{i}") for i in range(n))


#: the hyperparameters of the builder's tiny llama: 1 block, 64 wide, 4 heads, 2 KV heads, 2 tokens
LLAMA_KVS = [kv_u32("llama.block_count", 1), kv_u32("llama.context_length", 2048),
             kv_u32("llama.embedding_length", 64), kv_u32("llama.feed_forward_length", 128),
             kv_u32("llama.attention.head_count", 4), kv_u32("llama.attention.head_count_kv", 2),
             kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5), kv_f32("llama.rope.freq_base", 10000.0),
             kv_u32("llama.rope.dimension_count", 16), kv_tokens(2)]


def tinfo(name, dims, ttype, offset):
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)


def build(kvs=None, tensors=None, version=3, data=None, n_tensors=None, n_kv=None):
    """A GGUF from parts: by default a tiny but consistent llama (LLAMA_KVS) with two tensors,
    token_embd.weight Q8_0 [64, 2] (136 bytes) and blk.0.attn_norm.weight F32 [8] (32 bytes)."""
    kvs = [kv_str("general.architecture", "llama"), kv_u32("general.alignment", 32)] + LLAMA_KVS if kvs is None else kvs
    tensors = [tinfo("token_embd.weight", (64, 2), 8, 0), tinfo("blk.0.attn_norm.weight", (8,), 0, 160)] \
        if tensors is None else tensors
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32)
    return head + (bytes(range(256)) * 1)[:192] if data is None else head + data


def write(tmp_path, raw, name="m.gguf"):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def test_builder_makes_a_valid_file(tmp_path):
    p = write(tmp_path, build())
    h = check_gguf(p)
    assert [t.name for t in h.tensors] == ["token_embd.weight", "blk.0.attn_norm.weight"]
    assert h.metadata["llama.block_count"] == 1 and h.metadata["llama.rope.freq_base"] == 10000.0
    assert h.metadata["tokenizer.ggml.tokens"].count == 2
    r = GGUFReader(p)  # the gguf package agrees on every offset and size
    for t, rt in zip(h.tensors, r.tensors):
        assert (t.offset, t.n_bytes) == (rt.data_offset, rt.n_bytes)


def test_real_models_pass_and_agree_with_gguf(default_model):
    h = check_gguf(default_model)
    r = GGUFReader(default_model)
    assert len(h.tensors) == len(r.tensors) == 272
    for t, rt in zip(h.tensors, r.tensors):
        assert (t.name, t.offset, t.n_bytes) == (rt.name, rt.data_offset, rt.n_bytes)


HOSTILE = {
    "not gguf": (lambda: b"GGML" + b"\0" * 100, "no GGUF magic"),
    "version 1": (lambda: build(version=1), "unsupported GGUF version 1"),
    "dimension product overflows": (lambda: build(tensors=[tinfo("w", (2**32, 2**32, 2**32), 0, 0)]), "overflows"),
    "zero dimension": (lambda: build(tensors=[tinfo("w", (64, 0), 8, 0)]), "zero dimension"),
    "five dimensions": (lambda: build(tensors=[tinfo("w", (1, 1, 1, 1, 1), 0, 0)]), "5 dimensions"),
    "offset past the end": (lambda: build(tensors=[tinfo("blk.0.w", (64, 2), 8, 1 << 20)]), "past the end"),
    "misaligned offset": (lambda: build(tensors=[tinfo("blk.0.w", (64, 2), 8, 3)]), "not aligned"),
    "overlapping tensors": (lambda: build(tensors=[tinfo("a", (64, 2), 8, 0), tinfo("b", (8,), 0, 64)]), "overlap"),
    "duplicate name": (lambda: build(tensors=[tinfo("a", (8,), 0, 0), tinfo("a", (8,), 0, 32)]), "appears twice"),
    "long name": (lambda: build(tensors=[tinfo("x" * 80, (8,), 0, 0)]), "longer than 63"),
    "unknown tensor type": (lambda: build(tensors=[tinfo("w", (8,), 99, 0)]), "unknown type 99"),
    "partial block": (lambda: build(tensors=[tinfo("w", (48, 2), 8, 0)]), "whole number of Q8_0 blocks"),
    "array element type": (lambda: build(kvs=[s("k") + struct.pack("<IIQ", 9, 77, 1)]), "unknown element type 77"),
    "array of arrays": (lambda: build(kvs=[s("k") + struct.pack("<IIQ", 9, 9, 1)]), "arrays of arrays"),
    "huge array": (lambda: build(kvs=[s("k") + struct.pack("<IIQ", 9, 10, 2**60)]), "does not fit"),
    "huge string": (lambda: build(kvs=[s("k") + struct.pack("<IQ", 8, 2**40)]), "bytes long"),
    "unknown value type": (lambda: build(kvs=[s("k") + struct.pack("<I", 13)]), "unknown value type 13"),
    "bad alignment": (lambda: build(kvs=[kv_u32("general.alignment", 24)]), "power of two"),
    "tensor count": (lambda: build(n_tensors=2**40), "impossible"),
    "metadata count": (lambda: build(n_kv=2**33), "impossible"),
    "truncated header": (lambda: build()[:300], "truncated"),
    "truncated data": (lambda: build()[:-40], "past the end"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused(tmp_path, case):
    make, message = HOSTILE[case]
    p = write(tmp_path, make())
    with pytest.raises(GGUFInvalid, match=message):
        check_gguf(p)
    with pytest.raises(QESError, match=message):  # and the model loader refuses before anything else reads it
        GGUFModel(p)


def test_short_and_missing_files(tmp_path):
    with pytest.raises(GGUFInvalid, match="too short"):
        check_gguf(write(tmp_path, b"GGUF"))
    with pytest.raises(GGUFInvalid, match="cannot read"):
        check_gguf(tmp_path / "missing.gguf")


VALID = build()
HEADER_END = len(VALID) - 192


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(VALID))))
def test_fuzz_mutated_headers(tmp_path, edits, cut):
    raw = bytearray(VALID)
    for pos, val in edits:
        raw[pos] = val
    if cut is not None:
        raw = raw[:cut]
    p = write(tmp_path, bytes(raw), "fuzz.gguf")
    try:
        h = check_gguf(p)
    except GGUFInvalid:
        return
    size = len(raw)
    for t in h.tensors:  # whatever passes is safe to map
        assert 0 < t.n_bytes and t.offset + t.n_bytes <= size
        assert all(d > 0 for d in t.dims) and len(t.dims) <= 4
