"""The counter-based noise: golden vectors, statistics, antithetic pairs, every backend."""

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import make_golden
import reference as R
from qes_edge.native import binding as _native
from qes_edge.native.engine import CodeTensor, sigma_threshold, tensor_id
from qes_edge.native.quant import QESError

GOLDEN = json.loads((Path(__file__).resolve().parent.parent / "docs" / "noise-golden.json").read_text())


def q8_tensor(name, n):
    """A Q8_0 tensor of n elements (n a multiple of 32) over zeroed bytes; only its noise matters."""
    return CodeTensor(name, QT.Q8_0, n, np.zeros(n // 32 * 34, np.uint8))


def libqes_noise(name, n, seed, p32):
    if n % 32 == 0:
        return q8_tensor(name, n).noise(seed, p32)
    raise AssertionError("golden cases use whole Q8_0 blocks")


def test_spec_version_matches_golden():
    assert _native.lib.qes_noise_spec_version() == GOLDEN["spec_version"]


def test_hashes_and_mixers():
    for name, hexval in GOLDEN["hash"]["fnv1a64"].items():
        assert tensor_id(name) == int(hexval, 16) == R.fnv1a64(name.encode())
    for x, v in GOLDEN["mix"]["mix32"].items():
        assert int(R.mix32(int(x))) == v
    for x, v in GOLDEN["mix"]["mix64"].items():
        assert R.mix64(int(x)) == int(v, 16)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['tensor']}:{c['seed']}:{c['sigma']}")
@pytest.mark.parametrize("backend", _native.available_backends())
def test_golden_vectors(case, backend):
    assert sigma_threshold(case["sigma"]) == case["p32"] == R.sigma_threshold(case["sigma"])
    _native.set_backend(backend)
    try:
        pos, sign = libqes_noise(case["tensor"], case["n_elements"], case["seed"], case["p32"])
    finally:
        _native.set_backend("auto")
    assert len(pos) == case["count"]
    assert [[int(p), int(s)] for p, s in zip(pos[:12], sign[:12])] == case["first"]
    assert make_golden.digest(pos, sign) == case["sha256"]
    rp, rs = R.noise(case["tensor"], case["n_elements"], case["seed"], case["p32"])
    assert make_golden.digest(rp, rs) == case["sha256"]


def test_golden_file_is_what_the_reference_writes():
    assert make_golden.build() == GOLDEN


@pytest.mark.parametrize("sigma", [0.001, 0.005, 0.01, 0.1])
def test_density_and_balance(sigma):
    n = 32 * 200_000  # 6.4M elements
    p32 = sigma_threshold(sigma)
    pos, sign = q8_tensor("blk.7.ffn_gate.weight", n).noise(12345, p32)
    expected = n * sigma * np.sqrt(2 / np.pi)
    assert abs(len(pos) - expected) < 5 * np.sqrt(expected) + 2 * (n / 16384)  # Bernoulli + per-chunk rounding
    assert len(np.unique(pos)) == len(pos), "an element moved twice"
    assert abs(sign.sum()) < 5 * np.sqrt(len(sign)), "signs are not balanced"
    # spread: every 1/64 of the tensor gets its share
    hist = np.bincount((pos * 64 // n).astype(np.int64), minlength=64)
    assert hist.min() > 0.8 * expected / 64 and hist.max() < 1.2 * expected / 64


def test_antithetic_and_seed_and_name_keyed():
    p32 = sigma_threshold(0.02)
    t = q8_tensor("blk.1.attn_v.weight", 32 * 4000)
    pos_a, sign_a = t.noise(99, p32)
    pos_b, sign_b = t.noise(-99, p32)
    assert np.array_equal(pos_a, pos_b) and np.array_equal(sign_a, -sign_b)
    pos_c, _ = t.noise(100, p32)
    assert len(np.intersect1d(pos_a, pos_c)) < 0.1 * len(pos_a)
    # identity comes from the name: another tensor object with the same name draws the same noise
    same = q8_tensor("blk.1.attn_v.weight", 32 * 4000).noise(99, p32)
    other = q8_tensor("blk.1.attn_k.weight", 32 * 4000).noise(99, p32)
    assert np.array_equal(same[0], pos_a)
    assert len(np.intersect1d(other[0], pos_a)) < 0.1 * len(pos_a)


def test_prefix_stability():
    """Chunks are independent: a longer tensor of the same name shares the draws of its first chunks."""
    p32 = sigma_threshold(0.05)
    short, _ = q8_tensor("x", 16384 * 2).noise(5, p32)
    long_, _ = q8_tensor("x", 16384 * 3).noise(5, p32)
    assert np.array_equal(long_[: len(short)], short)


def test_bad_sigma_and_seed():
    for bad in [0.0, -0.01, float("nan"), float("inf"), 0.51, "x", None]:
        with pytest.raises(QESError, match="sigma"):
            sigma_threshold(bad)
    t = q8_tensor("blk.0.attn_q.weight", 64)
    for bad in [0, 2**31, -(2**31), 1.5, True]:
        with pytest.raises(QESError, match="blk.0.attn_q.weight"):
            t.noise(bad, sigma_threshold(0.01))
    with pytest.raises(QESError, match="threshold"):
        t.noise(1, 0)
