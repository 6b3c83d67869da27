"""The validator checks the hyperparameter VALUES llama.cpp reads, not only the file's structure:
files that used to pass it and then killed the process inside llama.cpp (SIGABRT on a block count
of 0 or an epsilon of NaN), computed NaN logits (a rope base of 0) or wrapped a context length to
-1 are refused with a GGUFInvalid naming the file, the key and the value.  A value fuzzer over the
real model's metadata never gets anything but GGUFInvalid, and whatever it accepts is consistent."""

import importlib.util
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qes_edge.gguf.check import MAX_CONTEXT_LENGTH, GGUFInvalid, _check, check_gguf
from test_gguf_check import LLAMA_KVS, build, kv_f32, kv_str, kv_u32, s, tinfo

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_gguf", ROOT / "benchmarks" / "fuzz_gguf.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_gguf"] = fuzz
_spec.loader.exec_module(fuzz)


def with_kv(key, raw_kv=None, tensors=None):
    """The builder's tiny llama with key replaced by raw_kv (or removed if None)."""
    kvs = [kv_str("general.architecture", "llama")] + [kv for kv in LLAMA_KVS if not kv.startswith(s(key))]
    return build(kvs=kvs + ([raw_kv] if raw_kv else []), tensors=tensors)


def refused(raw, match, name="m.gguf", size=None):
    with pytest.raises(GGUFInvalid, match=match) as e:
        _check(raw, size or len(raw), name)
    assert str(e.value).startswith(name + ":")
    return str(e.value)


def arr_u32(key, items, etype=4):
    return s(key) + struct.pack("<IIQ", 9, etype, len(items)) + struct.pack(f"<{len(items)}{'I' if etype == 4 else 'i'}", *items)


SYNTHETIC = {
    "block count 0": (kv_u32("llama.block_count", 0), r"llama.block_count = 0, but the file holds 1 blk.N"),
    "block count 2^31-1": (kv_u32("llama.block_count", 2**31 - 1), r"llama.block_count = 2147483647, but"),
    "block count 2^32-1": (kv_u32("llama.block_count", 2**32 - 1), r"llama.block_count = 4294967295, but"),
    "block count as i32": (s("llama.block_count") + struct.pack("<Ii", 5, 1), r"stored as i32; llama.cpp reads u32"),
    "no block count": (None, r"llama.block_count is missing"),
    "eps -1": (kv_f32("llama.attention.layer_norm_rms_epsilon", -1.0), r"layer_norm_rms_epsilon = -1.0, but"),
    "eps nan": (kv_f32("llama.attention.layer_norm_rms_epsilon", math.nan), r"layer_norm_rms_epsilon = nan, but .*finite"),
    "eps 0": (kv_f32("llama.attention.layer_norm_rms_epsilon", 0.0), r"epsilon = 0.0, but .*positive"),
    "eps as string": (kv_str("llama.attention.layer_norm_rms_epsilon", "1e-5"), r"= '1e-5', but it is stored as string; llama.cpp reads f32"),
    "eps as array": (s("llama.attention.layer_norm_rms_epsilon") + struct.pack("<IIQf", 9, 6, 1, 1e-5),
                     r"stored as array of 1 f32; llama.cpp reads f32"),
    "freq_base 0": (kv_f32("llama.rope.freq_base", 0.0), r"llama.rope.freq_base = 0.0, but a rope frequency base"),
    "freq_base -1": (kv_f32("llama.rope.freq_base", -1.0), r"llama.rope.freq_base = -1.0, but"),
    "freq_base nan": (kv_f32("llama.rope.freq_base", math.nan), r"llama.rope.freq_base = nan, but .*finite"),
    "freq_base tiny": (kv_f32("llama.rope.freq_base", 1e-45), r"llama.rope.freq_base = .*e-45, but"),
    "freq_base inf": (kv_f32("llama.rope.freq_base", math.inf), r"llama.rope.freq_base = inf, but .*finite"),
    "context 2^32-1": (kv_u32("llama.context_length", 2**32 - 1), r"llama.context_length = 4294967295, but it must lie in 1..16777216"),
    "context 2^31-1": (kv_u32("llama.context_length", 2**31 - 1), r"llama.context_length = 2147483647, but"),
    "context 0": (kv_u32("llama.context_length", 0), r"llama.context_length = 0, but"),
    "embedding mismatch": (kv_u32("llama.embedding_length", 128), r"token_embd.weight has dimensions \[64, 2\], but llama.embedding_length = 128"),
    "heads 0": (kv_u32("llama.attention.head_count", 0), r"llama.attention.head_count = 0, but it must lie in 1"),
    "heads do not divide": (kv_u32("llama.attention.head_count", 3), r"head_count = 3, but 3 heads \(block 0\) do not divide llama.embedding_length = 64"),
    "kv heads 0": (kv_u32("llama.attention.head_count_kv", 0), r"head_count_kv = 0, but"),
    "kv heads do not divide": (kv_u32("llama.attention.head_count_kv", 3), r"head_count_kv = 3, but 3 KV heads \(block 0\) do not divide the 4"),
    "no heads": (None, r"llama.attention.head_count is missing"),
    "heads array, bad element": (arr_u32("llama.attention.head_count", [0]), r"its element for block 0 is 0"),
    "heads array, i32 -1": (arr_u32("llama.attention.head_count", [-1], etype=5), r"element for block 0 is 4294967295"),
    "heads array, wrong length": (arr_u32("llama.attention.head_count", [4, 4]), r"one element per block \(1\)"),
    "heads array of floats": (s("llama.attention.head_count") + struct.pack("<IIQf", 9, 6, 1, 4.0), r"stored as array of 1 f32"),
    "rope dims odd": (kv_u32("llama.rope.dimension_count", 15), r"rope.dimension_count = 15, but it must be even"),
    "rope dims too many": (kv_u32("llama.rope.dimension_count", 32), r"rope.dimension_count = 32, but it must be even and in 1..16"),
    "rope scaling factor tiny": (kv_f32("llama.rope.scaling.factor", 1e-30), r"scaling.factor = .*, but it must lie in"),
    "rope scaling type": (kv_str("llama.rope.scaling.type", "bogus"), r"rope.scaling.type = 'bogus', but llama.cpp knows only"),
    "tokens short": (s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1) + s("a"), r"tokenizer.ggml.tokens = array of 1 string, but token_embd.weight has 2 rows"),
    "tokens as u32 array": (arr_u32("tokenizer.ggml.tokens", [1, 2]), r"must be an array of strings"),
    "vocab size mismatch": (kv_u32("llama.vocab_size", 3), r"llama.vocab_size = 3, but token_embd.weight has 2 rows"),
    "expert count above limit": (kv_u32("llama.expert_count", 2000), r"expert_count = 2000, but it must lie in 0..1024"),
    "experts without used count": (kv_u32("llama.expert_count", 8), r"expert_used_count is missing or 0"),
    "used experts without experts": (kv_u32("llama.expert_used_count", 2), r"expert_used_count = 2, but the file has no experts"),
    "nextn above blocks": (kv_u32("llama.nextn_predict_layers", 2), r"nextn_predict_layers = 2, but it must be at most"),
    "float hparam inf": (kv_f32("llama.attention.clamp_kqv", math.inf), r"clamp_kqv = inf, but it must be a finite number"),
}
#: the key each SYNTHETIC case replaces (its raw kv's key; for the None cases, the key removed)
_REMOVED = {"no block count": "llama.block_count", "no heads": "llama.attention.head_count"}


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_bad_hyperparameters_are_refused(case):
    raw_kv, match = SYNTHETIC[case]
    key = _REMOVED.get(case) or raw_kv[8:8 + struct.unpack_from("<Q", raw_kv)[0]].decode()
    refused(with_kv(key, raw_kv), match)


def test_block_groups_must_be_numbered_from_zero():
    ts = [tinfo("token_embd.weight", (64, 2), 8, 0), tinfo("blk.1.attn_norm.weight", (8,), 0, 160)]
    refused(with_kv("x", None, ts), r"llama.block_count = 1, but the blk.N tensor groups are not numbered 0..0 \(blk.0 is missing\)")
    ts = [tinfo("token_embd.weight", (64, 2), 8, 0), tinfo("blk.00.attn_norm.weight", (8,), 0, 160)]
    refused(with_kv("x", None, ts), r"'blk.00.attn_norm.weight' has a malformed block number")
    ts = [tinfo("token_embd.weight", (64, 2), 8, 0)]
    refused(with_kv("x", None, ts), r"llama.block_count = 1, but the file holds 0 blk.N tensor groups")


def test_architecture_key():
    refused(build(kvs=LLAMA_KVS), r"no general.architecture key")
    refused(build(kvs=[kv_u32("general.architecture", 1)] + LLAMA_KVS), r"general.architecture = 1, but it must be an architecture name")
    # another architecture: its own keys are checked (here: none of llama's count)
    refused(build(kvs=[kv_str("general.architecture", "qwen2")] + LLAMA_KVS), r"qwen2.block_count is missing")
    # an architecture qes-edge does not know passes the generic checks when they hold
    other = [kv_str("general.architecture", "newarch")] + [
        kv.replace(s(k), s("newarch" + k[5:]), 1) if k.startswith("llama.") else kv for kv in LLAMA_KVS for k in [_key(kv)]]
    raw = build(kvs=other)
    assert _check(raw, len(raw), "m.gguf").metadata["newarch.block_count"] == 1
    other[1] = kv_u32("newarch.block_count", 0)
    refused(build(kvs=other), r"newarch.block_count = 0, but the file holds 1 blk.N")


def _key(raw_kv):
    return raw_kv[8:8 + struct.unpack_from("<Q", raw_kv)[0]].decode()


def test_head_arrays_with_one_element_per_block_pass():
    raw = with_kv("llama.attention.head_count", arr_u32("llama.attention.head_count", [4]))
    assert _check(raw, len(raw), "m.gguf").metadata["llama.attention.head_count"].items == (4,)
    raw = with_kv("llama.attention.head_count_kv", arr_u32("llama.attention.head_count_kv", [3], etype=5))
    refused(raw, r"3 KV heads \(block 0\) do not divide the 4 query heads")


# -- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_header(default_model):
    size = default_model.stat().st_size
    with open(default_model, "rb") as f:
        head = f.read(16 << 20)
    model, where = fuzz.parse(head, size)
    return head, size, model, where


def test_real_model_hyperparameters_are_decoded(default_model):
    h = check_gguf(default_model)
    m = h.metadata
    assert m["general.architecture"] == "llama"
    assert m["llama.block_count"] == 30 == len({t.name.split(".")[1] for t in h.tensors if t.name.startswith("blk.")})
    assert m["llama.embedding_length"] == 576 and m["llama.attention.head_count"] == 9
    assert m["llama.attention.head_count_kv"] == 3
    assert m["tokenizer.ggml.tokens"].count == 49152 == next(t for t in h.tensors if t.name == "token_embd.weight").dims[1]
    assert 0 < m["llama.attention.layer_norm_rms_epsilon"] < 1e-3


#: the values an outside attack put in the default model: each passed the old validator and then
#: aborted llama.cpp (block count, epsilon), computed NaN logits (rope base) or broke the load
#: (context length).  (key, GGUF value type, value, what the message must say)
REGRESSIONS = {
    "block_count 0": ("llama.block_count", 4, 0, r"llama.block_count = 0, but the file holds 30 blk.N tensor groups"),
    "block_count 2^31-1": ("llama.block_count", 4, 2**31 - 1, r"llama.block_count = 2147483647, but the file holds 30"),
    "block_count 2^32-1": ("llama.block_count", 4, 2**32 - 1, r"llama.block_count = 4294967295, but the file holds 30"),
    "eps -1": ("llama.attention.layer_norm_rms_epsilon", 6, -1.0, r"layer_norm_rms_epsilon = -1.0, but"),
    "eps NaN": ("llama.attention.layer_norm_rms_epsilon", 6, math.nan, r"layer_norm_rms_epsilon = nan, but it must be a finite"),
    "freq_base 0": ("llama.rope.freq_base", 6, 0.0, r"llama.rope.freq_base = 0.0, but a rope frequency base must be at least 1"),
    "freq_base -1": ("llama.rope.freq_base", 6, -1.0, r"llama.rope.freq_base = -1.0, but a rope frequency base"),
    "freq_base NaN": ("llama.rope.freq_base", 6, math.nan, r"llama.rope.freq_base = nan, but it must be a finite"),
    "context_length 2^32-1": ("llama.context_length", 4, 2**32 - 1, rf"llama.context_length = 4294967295, but it must lie in 1..{MAX_CONTEXT_LENGTH}"),
    "context_length 2^31-1": ("llama.context_length", 4, 2**31 - 1, r"llama.context_length = 2147483647, but it must lie in"),
    # these four aborted `train` (SIGABRT: llama-cpp-python looks the id up in the vocabulary)
    "bos_token_id 2^31-1": ("tokenizer.ggml.bos_token_id", 4, 2**31 - 1,
                            r"tokenizer.ggml.bos_token_id = 2147483647, but the vocabulary holds tokens 0..49151"),
    "bos_token_id 2^32-1": ("tokenizer.ggml.bos_token_id", 4, 2**32 - 1,
                            r"tokenizer.ggml.bos_token_id = 4294967295, but the vocabulary holds tokens 0..49151"),
    "eos_token_id 2^31-1": ("tokenizer.ggml.eos_token_id", 4, 2**31 - 1,
                            r"tokenizer.ggml.eos_token_id = 2147483647, but the vocabulary holds tokens 0..49151"),
    "eos_token_id 2^32-1": ("tokenizer.ggml.eos_token_id", 4, 2**32 - 1,
                            r"tokenizer.ggml.eos_token_id = 4294967295, but the vocabulary holds tokens 0..49151"),
    "padding_token_id 49152": ("tokenizer.ggml.padding_token_id", 4, 49152, r"padding_token_id = 49152, but the vocabulary"),
    "unknown_token_id 2^32-1": ("tokenizer.ggml.unknown_token_id", 4, 2**32 - 1, r"unknown_token_id = 4294967295, but"),
}


def patched(head, where, key, vtype, value) -> bytes:
    off, size = where[key]
    b = bytearray(head)
    b[off:off + size] = struct.pack("<" + fuzz.FMT[vtype], value)
    return bytes(b)


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regression_values_in_the_real_model_are_refused(real_header, case):
    head, size, _, where = real_header
    key, vtype, value, match = REGRESSIONS[case]
    _check(head, size, "m.gguf")  # unpatched, the header passes
    refused(patched(head, where, key, vtype, value), match, size=size)


# -- the value fuzzer -------------------------------------------------------------------------------
FUZZ_CASES = 1000


def test_fuzz_values_of_the_real_model(real_header):
    base = fuzz.reduce(real_header[2])
    head, size = fuzz.serialize(base)
    assert _check(head, size, "fuzz.gguf").metadata["tokenizer.ggml.tokens"].count == fuzz.REDUCED_TOKENS
    assert fuzz.invariants(base) == []
    t0 = time.perf_counter()
    accepted, refused_n, failures = fuzz.run(base, FUZZ_CASES, seed=20240601)
    dt = time.perf_counter() - t0
    print(f"\n{FUZZ_CASES} value-fuzz cases in {dt:.2f} s: {accepted} accepted, {refused_n} refused")
    assert failures == []
    assert accepted > 50 and refused_n > FUZZ_CASES // 2  # both sides are exercised


def test_fuzz_values_of_the_full_real_header(real_header):
    """A few cases on the unreduced header (its 49152 tokens and 48900 merges parsed each time)."""
    accepted, refused_n, failures = fuzz.run(real_header[2], 12, seed=77)
    assert failures == [] and accepted + refused_n == 12 + len(fuzz.SEED_CASES)


def test_fuzzer_notices_a_validator_that_lets_values_through(real_header, monkeypatch):
    """The fuzzer's own invariant check catches an accepted file with a bad value."""
    base = fuzz.reduce(real_header[2])
    assert fuzz.invariants(base.set("llama.block_count", 4, 0))
    assert fuzz.invariants(base.set("llama.rope.freq_base", 6, math.nan))
    monkeypatch.setattr(fuzz, "_check", lambda *a: None)
    _, _, failures = fuzz.run(base, 200, seed=1)
    assert failures and all("accepted but" in f for _, f in failures)


# -- the driver's self-check ----------------------------------------------------------------------
def test_self_check_names_nan_logits(tmp_path):
    from qes_edge.llama.driver import ModelDriver, SelfCheckFailed

    d = ModelDriver.__new__(ModelDriver)
    d.path = tmp_path / "nan.gguf"
    d.tokenize = lambda text: [1, 2, 3]
    d.logits = lambda tokens: np.array([0.5, np.nan, 1.0], dtype=np.float32)
    with pytest.raises(SelfCheckFailed, match=r"nan.gguf: the self-check logits are not finite \(1 of 3 are NaN/inf\)"):
        d.self_check()
    d.logits = lambda tokens: np.array([0.5, np.inf], dtype=np.float32)
    with pytest.raises(SelfCheckFailed, match=r"NaN/inf"):
        d.self_check()


# -- through llama.cpp: each regression file is refused before llama.cpp reads it -----------------
_PROBE = r"""
import json, sys
import qes_edge.llama.driver as drv
from qes_edge.gguf.check import GGUFInvalid
from qes_edge.native.quant import QESError
touched = []
real = drv.load_llama
def spy(*a, **k):
    touched.append(1)
    return real(*a, **k)
drv.load_llama = spy
try:
    drv.ModelDriver(sys.argv[1])
    out = {"raised": None}
except (GGUFInvalid, QESError) as e:
    out = {"raised": type(e).__name__, "message": str(e)}
except Exception as e:
    out = {"raised": "other:" + type(e).__name__, "message": str(e)}
out["llama_touched"] = bool(touched)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regression_files_through_the_driver(tmp_path, real_header, default_model, case):
    head, _, _, where = real_header
    key, vtype, value, match = REGRESSIONS[case]
    p = tmp_path / "attack.gguf"
    shutil.copyfile(default_model, p)
    off, size = where[key]
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<" + fuzz.FMT[vtype], value))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", _PROBE, str(p)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, f"the process died with {r.returncode}: {r.stderr[-2000:]}"
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["raised"] in ("GGUFInvalid", "QESError"), out
    assert not out["llama_touched"], out
    assert re.search(match, out["message"]) and str(p) in out["message"], out


_SELF_CHECK_PROBE = r"""
import sys
import qes_edge.gguf.check as g
g.check_hparams = lambda *a: None   # let the file through, as the old validator did
from qes_edge.llama.driver import ModelDriver, SelfCheckFailed
try:
    ModelDriver(sys.argv[1], n_threads=2)
    print("RESULT none")
except SelfCheckFailed as e:
    print("RESULT " + str(e))
"""


@pytest.mark.slow
def test_self_check_names_nan_logits_of_a_real_model(tmp_path, real_header, default_model):
    """A rope base of 0 makes llama.cpp compute NaN logits; were such a file to pass validation,
    the self-check says so (it used to say "evaluation is not deterministic", as NaN != NaN)."""
    p = tmp_path / "nan-rope.gguf"
    shutil.copyfile(default_model, p)
    off, _ = real_header[3]["llama.rope.freq_base"]
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<f", 0.0))
    r = subprocess.run([sys.executable, "-c", _SELF_CHECK_PROBE, str(p)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    msg = r.stdout.split("RESULT ", 1)[1]
    assert msg.startswith("nan-rope.gguf: the self-check logits are not finite") and "NaN/inf" in msg, msg
