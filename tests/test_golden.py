"""docs/noise-golden.json, every vector: libqes on every backend and the NumPy reference.

The file is written by tests/make_golden.py from tests/reference.py alone; these tests check
that libqes (through qes_edge.native.engine.CodeTensor) and the reference both give its bytes, and
that regenerating it gives exactly the committed text."""

import hashlib

import numpy as np
import pytest

import make_golden as M
import reference as R
from qes_edge.native import binding as _native
from qes_edge.native import fixed_point
from qes_edge.native.engine import CodeTensor, Perturbation, Step, digest_tensors
from qes_edge.native.quant import QT, QESError

TEXT = M.GOLDEN_PATH.read_text()
GOLDEN = __import__("json").loads(TEXT)


@pytest.fixture(params=_native.available_backends())
def backend(request):
    _native.set_backend(request.param)
    try:
        yield request.param
    finally:
        _native.set_backend("auto")


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def input_bytes(case) -> np.ndarray:
    if "bytes" in case:
        return np.frombuffer(bytes.fromhex(case["bytes"]), np.uint8).copy()
    L = R.layout(case["type"])
    data = M.stream(case["stream"], case["n_elements"] // L["E"] * L["B"])
    assert sha(data) == case["bytes_sha256"]
    return data


def tensor(case, data, name=None) -> CodeTensor:
    return CodeTensor(name or case.get("tensor", "golden"), QT[case["type"]], case["n_elements"], data)


def ids(prefix):
    return lambda c: f"{prefix}{c['type']}:{c.get('mode', '')}:{c.get('seed', '')}:{c.get('tensor', '')}"


# --- the file itself -------------------------------------------------------------------------------

def test_file_is_exactly_what_make_golden_writes():
    assert M.render(M.build()) == TEXT


def test_every_type_is_covered():
    types = set(R.TYPE_NAMES)
    assert {c["type"] for c in GOLDEN["codecs"]} == types
    assert {c["type"] for c in GOLDEN["perturb"]} == types
    assert {c["type"] for c in GOLDEN["update"] if c["mode"] == "replay"} == types
    assert {c["type"] for c in GOLDEN["update"] if c["mode"] == "stored"} == types
    assert {c["anti_windup"] for c in GOLDEN["update"]} == {True, False}


# --- 6.1 fixed point --------------------------------------------------------------------------------

def test_beta_q14():
    for beta, q in GOLDEN["fixed_point"]["beta_q14"]:
        assert fixed_point.beta_to_q14(beta) == q == R.beta_to_q14(beta), beta


def test_coefs_q16():
    for case in GOLDEN["fixed_point"]["coefs_q16"]:
        got = fixed_point.coefs_to_q16(case["coefs"], case["alpha"], case["sigma"])
        assert got.dtype == np.int32 and got.tolist() == case["q16"]
        assert R.coefs_to_q16(case["coefs"], case["alpha"], case["sigma"]) == case["q16"]
    for case in GOLDEN["fixed_point"]["coefs_q16_refused"]:
        with pytest.raises(ValueError):
            fixed_point.coefs_to_q16(case["coefs"], case["alpha"], case["sigma"])
        with pytest.raises(ValueError):
            R.coefs_to_q16(case["coefs"], case["alpha"], case["sigma"])


# --- 4 codes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN["codecs"], ids=ids("codec:"))
def test_codec_libqes(case, backend):
    data = input_bytes(case)
    t = tensor(case, data)
    assert (t.info.block_elems, t.info.block_bytes, t.info.cmin, t.info.cmax) == \
        (case["block_elems"], case["block_bytes"], case["cmin"], case["cmax"])
    assert t.codes().tolist() == case["codes"]
    assert t.levels().tolist() == case["levels"]
    t.set_codes(case["set_codes"])
    assert data.tobytes().hex() == case["bytes_after_set"]
    assert t.codes().tolist() == case["set_codes"]


@pytest.mark.parametrize("case", GOLDEN["codecs"], ids=ids("codec:"))
def test_codec_reference(case):
    data = input_bytes(case)
    L = R.layout(case["type"])
    assert (L["id"], L["E"], L["B"], L["cmin"], L["cmax"]) == \
        (case["ggml_type"], case["block_elems"], case["block_bytes"], case["cmin"], case["cmax"])
    assert R.code_get(case["type"], data).tolist() == case["codes"]
    assert R.levels(case["type"], data).tolist() == case["levels"]
    after = R.code_set(case["type"], data, case["set_codes"])
    assert after.tobytes().hex() == case["bytes_after_set"]
    assert R.code_get(case["type"], after).tolist() == case["set_codes"]


@pytest.mark.parametrize("case", GOLDEN["codecs"], ids=ids("codec:"))
def test_codec_layout_is_ggmls(case):
    """The spec's bit positions and levels against the gguf package's dequantizers: moving the
    codes from one pattern to another moves each value by (its level) x (its code change)."""
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    qt = GGMLQuantizationType[case["type"]]
    before = input_bytes(case)
    after = np.frombuffer(bytes.fromhex(case["bytes_after_set"]), np.uint8)
    v0 = gq.dequantize(before, qt).astype(np.float64).reshape(-1)
    v1 = gq.dequantize(after, qt).astype(np.float64).reshape(-1)
    want = np.asarray(case["levels"]) * (np.asarray(case["set_codes"]) - np.asarray(case["codes"]))
    scale = max(1.0, float(np.abs(v0).max()))
    assert np.allclose(v1 - v0, want, rtol=0, atol=1e-5 * scale)


# --- 5 perturb / restore -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN["perturb"], ids=ids("perturb:"))
def test_perturb_restore_libqes(case, backend):
    data = input_bytes(case)
    original = data.copy()
    t = tensor(case, data)
    assert len(t.noise(case["seed"], case["p32"])[0]) == case["draws"]
    p = t.perturb(case["seed"], case["p32"])
    assert p.mask.nbytes == case["mask_bytes"]
    assert p.mask.tobytes().hex() == case["mask"]
    assert p.applied == case["applied"]
    assert sha(data) == case["bytes_after_sha256"]
    perturbed = data.copy()
    golden_mask = np.frombuffer(bytes.fromhex(case["mask"]), np.uint8).copy()
    # a mask one byte short is refused and nothing is written
    with pytest.raises(QESError):
        t.restore(Perturbation(t, case["seed"], case["p32"], golden_mask[:-1].copy(), case["applied"]))
    assert np.array_equal(data, perturbed)
    # restore with the golden mask (not libqes' own) gives every byte back
    t.restore(Perturbation(t, case["seed"], case["p32"], golden_mask, case["applied"]))
    assert np.array_equal(data, original)


@pytest.mark.parametrize("case", GOLDEN["perturb"], ids=ids("perturb:"))
def test_perturb_restore_reference(case):
    data = input_bytes(case)
    name, seed, p32 = case["tensor"], case["seed"], case["p32"]
    assert R.sigma_threshold(case["sigma"]) == p32
    after, mask, applied = R.perturb_bytes(case["type"], data, name, seed, p32)
    assert R.mask_bytes(case["n_elements"], p32) == mask.size == case["mask_bytes"]
    assert mask.tobytes().hex() == case["mask"]
    assert applied == case["applied"]
    assert sha(after) == case["bytes_after_sha256"]
    assert np.array_equal(R.restore_bytes(case["type"], after, name, seed, p32, bytes.fromhex(case["mask"])), data)


# --- 6 update ------------------------------------------------------------------------------------------

def steps_of(case):
    return [Step(s["seeds"], s["coefs_q16"], s["p32"]) for s in case["steps"]]


def residual_of(case):
    return None if case["residual"] is None else np.asarray(case["residual"], dtype=np.int32)


@pytest.mark.parametrize("case", GOLDEN["update"], ids=ids("update:"))
def test_update_libqes(case, backend):
    assert fixed_point.beta_to_q14(case["beta"]) == case["beta_q14"]
    data = input_bytes(case)
    r = residual_of(case)
    stats = tensor(case, data).update(steps_of(case), r, beta=case["beta"], clamp_q16=case["clamp_q16"],
                                      anti_windup=case["anti_windup"])
    assert sha(data) == case["bytes_after_sha256"]
    assert (stats.changed, stats.dropped) == (case["changed"], case["dropped"])
    if r is not None:
        assert M.res_sha(r) == case["residual_after_sha256"]


@pytest.mark.parametrize("case", GOLDEN["update"], ids=ids("update:"))
def test_update_reference(case):
    steps = [(s["seeds"], s["coefs_q16"], s["p32"]) for s in case["steps"]]
    after, r, changed, dropped = R.update_bytes(case["type"], input_bytes(case), case["tensor"], steps,
                                                residual_of(case), case["beta_q14"], case["clamp_q16"],
                                                case["anti_windup"])
    assert sha(after) == case["bytes_after_sha256"]
    assert (changed, dropped) == (case["changed"], case["dropped"])
    if case["residual"] is not None:
        assert M.res_sha(r) == case["residual_after_sha256"]


# --- 8 weights hash ------------------------------------------------------------------------------------

def test_weights_digest(backend):
    g = GOLDEN["digest"]
    tensors = [CodeTensor(row["tensor"], QT[row["type"]], row["n_elements"],
                          np.frombuffer(bytes.fromhex(row["bytes"]), np.uint8).copy()) for row in g["tensors"]]
    assert digest_tensors(tensors) == g["sha256"]
    assert R.weights_digest([(row["tensor"], bytes.fromhex(row["bytes"])) for row in g["tensors"]]) == g["sha256"]
    assert digest_tensors(tensors[::-1]) != g["sha256"]  # the order is part of the hash
