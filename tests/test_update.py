"""The error-feedback update: libqes against the NumPy reference, bit for bit, on every backend."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as R
from conftest import random_blocks
from qes_edge.native import binding as _native
from qes_edge.native.engine import CodeTensor, Step, random_steps, sigma_threshold
from qes_edge.native.fixed_point import beta_to_q14, coefs_to_q16
from qes_edge.native.quant import TRAINABLE, QESError


def random_pair_steps(rng, n_steps, n_pairs, sigma, alpha):
    return random_steps(rng, n_steps, 2 * n_pairs, sigma, alpha)


def ref_steps(steps):
    return [(s.seeds, s.coefs_q16, s.threshold) for s in steps]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(TRAINABLE), n_blocks=st.integers(1, 1100), rng_seed=st.integers(0, 2**32 - 1),
       n_steps=st.integers(1, 6), n_pairs=st.integers(1, 6), sigma=st.sampled_from([0.005, 0.01, 0.05, 0.3]),
       alpha=st.sampled_from([0.0005, 0.01, 0.2]), beta=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       anti_windup=st.booleans(), stored=st.booleans(), threads=st.sampled_from([1, 2, 3]),
       clamp=st.sampled_from([98304, 98304, 0, 1000, 32767, 32768, 131071]),
       backend=st.sampled_from(_native.available_backends()))
def test_update_matches_reference(qtype, n_blocks, rng_seed, n_steps, n_pairs, sigma, alpha, beta,
                                  anti_windup, stored, threads, clamp, backend):
    rng = np.random.default_rng(rng_seed)
    data, n = random_blocks(qtype, n_blocks, rng, extreme=0.2)
    t = CodeTensor("blk.5.ffn_up.weight", qtype, n, data)
    codes = t.codes()
    steps = random_pair_steps(rng, n_steps, n_pairs, sigma, alpha)
    if stored:  # stored-residual mode: one step, a starting residual
        steps = steps[-1:]
        residual = rng.integers(-clamp, clamp + 1, size=n).astype(np.int32)
    else:
        residual = None
    ref_codes, ref_r, ref_changed = R.update(codes, t.info.cmin, t.info.cmax, t.name, ref_steps(steps),
                                             residual, beta_to_q14(beta), clamp, anti_windup)
    _native.set_backend(backend)
    try:
        res = residual.copy() if stored else None
        stats = t.update(steps, res, beta=beta, clamp_q16=clamp, anti_windup=anti_windup, threads=threads)
    finally:
        _native.set_backend("auto")
    assert np.array_equal(t.codes(), ref_codes)
    assert stats.changed == ref_changed
    if stored:
        assert np.array_equal(res, ref_r)


def test_threads_and_backends_give_same_bytes():
    rng = np.random.default_rng(11)
    qtype = TRAINABLE[1]  # Q4_1, the default model's type
    data, n = random_blocks(qtype, 20000, rng)  # 640k elements, 40 tiles
    steps = random_pair_steps(rng, 8, 15, 0.01, 0.001)
    outputs = set()
    for backend in _native.available_backends():
        for threads in (1, 2, 5):
            d = data.copy()
            _native.set_backend(backend)
            CodeTensor("blk.0.ffn_gate.weight", qtype, n, d).update(steps, threads=threads)
            outputs.add(d.tobytes())
    _native.set_backend("auto")
    assert len(outputs) == 1
    assert next(iter(outputs)) != data.tobytes()


def test_error_feedback_accumulates_small_steps():
    """A coefficient too small to round to a code change on its own moves codes once the residual
    carries it over several replayed steps -- and not without error feedback (beta = 0)."""
    rng = np.random.default_rng(5)
    qtype = TRAINABLE[0]
    data, n = random_blocks(qtype, 2048, rng)
    data_noef = data.copy()
    seeds = np.array([4242, -4242], dtype=np.int64)
    # a mirrored pair with opposite coefficients pushes each drawn element the same way:
    # 2 * (alpha/sigma) * c = 2 * 0.2 * 1 = 0.4 code units, which rounds to no change
    step = Step(seeds, coefs_to_q16([1.0, -1.0], 0.002, 0.01), sigma_threshold(0.01))
    # replaying it once first leaves r = 0.4, so the applied step is 0.4 + 0.9 * 0.4 = 0.76 -> 1
    window = [step, step]
    ef = CodeTensor("w", qtype, n, data).update(window, beta=0.9)
    noef = CodeTensor("w", qtype, n, data_noef).update(window[-1:], beta=0.0)
    assert noef.changed == 0
    drawn = len(CodeTensor("w", qtype, n, data.copy()).noise(4242, step.threshold)[0])
    assert ef.changed + ef.dropped == drawn > 0


def test_update_bad_input():
    rng = np.random.default_rng(6)
    data, n = random_blocks(TRAINABLE[0], 64, rng)
    t = CodeTensor("blk.9.attn_k.weight", TRAINABLE[0], n, data)
    good = Step([1, -1], [100, -100], sigma_threshold(0.01))
    with pytest.raises(QESError, match="blk.9.attn_k.weight.*seed"):
        t.update([Step([0], [1], sigma_threshold(0.01))])
    with pytest.raises(QESError, match="coefficients too large"):
        t.update([Step([1, 2], [2**30, 2**30], sigma_threshold(0.01))])
    with pytest.raises(QESError, match="residual must be"):
        t.update([good], np.zeros(n, np.int64))
    raw = np.zeros(n * 4 + 4, np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.int32, count=n, offset=1)
    misaligned.flags.writeable  # a view of a writable buffer
    with pytest.raises(QESError, match="misaligned"):
        t.update([good], misaligned)
    with pytest.raises(QESError, match="out of range"):
        t.update([good], np.full(n, 98305, np.int32))
    with pytest.raises(QESError, match="at least one step"):
        t.update([])
    assert np.array_equal(t.codes(), CodeTensor("x", TRAINABLE[0], n, data.copy()).codes())  # nothing written


@pytest.mark.parametrize("backend", _native.available_backends())
def test_members_sharing_a_seed_are_merged_exactly(backend):
    """libqes scatters each |seed| of a step once with the members' net coefficient: a repeated
    seed, a mirrored pair whose coefficients cancel and a lone member all match the reference,
    which scatters member by member."""
    rng = np.random.default_rng(21)
    qtype = TRAINABLE[1]
    data, n = random_blocks(qtype, 3000, rng)
    t = CodeTensor("blk.1.attn_q.weight", qtype, n, data)
    p32 = sigma_threshold(0.05)
    seeds = np.array([5, 5, -5, 7, -7, 11, 13, -13], dtype=np.int64)
    coefs = np.array([9000, -4000, 3000, 2500, 2500, -7000, 0, 6000], dtype=np.int32)  # 7's pair cancels
    steps = [Step(seeds, coefs, p32), Step(seeds[::-1].copy(), coefs, p32)]
    ref_codes, _, ref_changed = R.update(t.codes(), t.info.cmin, t.info.cmax, t.name, ref_steps(steps),
                                         None, beta_to_q14(0.9), 98304, True)
    _native.set_backend(backend)
    try:
        stats = t.update(steps, beta=0.9)
    finally:
        _native.set_backend("auto")
    assert stats.changed == ref_changed > 0
    assert np.array_equal(t.codes(), ref_codes)
