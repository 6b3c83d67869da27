"""Perturb / restore: property tests on random blocks of every type, codes at both range ends."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as R
from conftest import random_blocks
from qes_edge.native import binding as _native
from qes_edge.native.engine import CodeTensor, GroupPerturbation, TensorGroup, sigma_threshold
from qes_edge.native.quant import TRAINABLE, QESError, type_info

seeds = st.integers(1, 2**31 - 1).flatmap(lambda s: st.sampled_from([s, -s]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(TRAINABLE), n_blocks=st.integers(1, 130), rng_seed=st.integers(0, 2**32 - 1),
       extreme=st.sampled_from([0.0, 0.3, 1.0]), seed=seeds, sigma=st.floats(0.001, 0.5),
       backend=st.sampled_from(_native.available_backends()))
def test_perturb_restore_is_exact(qtype, n_blocks, rng_seed, extreme, seed, sigma, backend):
    rng = np.random.default_rng(rng_seed)
    data, n = random_blocks(qtype, n_blocks, rng, extreme)
    t = CodeTensor("blk.0.ffn_up.weight", qtype, n, data)
    before = data.copy()
    codes = t.codes()
    p32 = sigma_threshold(sigma)
    _native.set_backend(backend)
    try:
        pert = t.perturb(seed, p32)
        after = t.codes()
        # the same codes as the reference's gated perturbation
        assert np.array_equal(after, R.perturb(codes, t.info.cmin, t.info.cmax, t.name, seed, p32))
        assert pert.applied == np.count_nonzero(after != codes)
        assert np.all(np.abs(after - codes) <= 1)
        assert after.min() >= t.info.cmin and after.max() <= t.info.cmax
        pert.restore()
    finally:
        _native.set_backend("auto")
    assert np.array_equal(before, data), "restore did not return every byte"


@pytest.mark.parametrize("qtype", TRAINABLE, ids=lambda q: q.name)
def test_gating_at_range_ends(qtype):
    """Every code at cmax: the + moves are gated, the - moves applied; and the mirror seed the reverse."""
    rng = np.random.default_rng(1)
    data, n = random_blocks(qtype, 4096 // (32 if qtype.value < 10 else 256) * 8, rng)
    t = CodeTensor("blk.3.ffn_down.weight", qtype, n, data)
    t.set_codes(np.full(n, t.info.cmax))
    before = data.copy()
    p32 = sigma_threshold(0.2)
    pos, sign = t.noise(17, p32)
    p = t.perturb(17, p32)
    assert p.applied == np.count_nonzero(sign < 0) > 0
    assert np.array_equal(t.codes()[pos[sign < 0].astype(np.int64)], np.full((sign < 0).sum(), t.info.cmax - 1))
    p.restore()
    assert np.array_equal(before, data)
    q = t.perturb(-17, p32)
    assert q.applied == np.count_nonzero(sign > 0)
    q.restore()
    assert np.array_equal(before, data)


def test_restore_twice_or_elsewhere_is_refused():
    rng = np.random.default_rng(2)
    data, n = random_blocks(TRAINABLE[0], 1000, rng)
    a = CodeTensor("a", TRAINABLE[0], n, data)
    b = CodeTensor("b", TRAINABLE[0], n, data.copy())
    p = a.perturb(3, sigma_threshold(0.01))
    with pytest.raises(QESError, match="belongs to 'a'"):
        b.restore(p)
    p.restore()
    with pytest.raises(QESError, match="already restored"):
        p.restore()


def test_read_only_buffer_is_refused():
    rng = np.random.default_rng(3)
    data, n = random_blocks(TRAINABLE[1], 64, rng)
    data.flags.writeable = False
    t = CodeTensor("ro", TRAINABLE[1], n, data)
    with pytest.raises(QESError, match="read-only"):
        t.perturb(1, sigma_threshold(0.01))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(types=st.lists(st.sampled_from(TRAINABLE), min_size=1, max_size=6), rng_seed=st.integers(0, 2**32 - 1),
       seed=seeds, sigma=st.sampled_from([0.005, 0.05, 0.4]), threads=st.sampled_from([1, 2, 3, 0]),
       backend=st.sampled_from(_native.available_backends()))
def test_group_perturb_equals_one_by_one(types, rng_seed, seed, sigma, threads, backend):
    """All tensors in one call on several threads: the bytes and masks of perturbing each alone,
    and restore returns every byte.  Sizes straddle the 8-chunk groups that threads share out."""
    rng = np.random.default_rng(rng_seed)
    tensors, singles = [], []
    for i, qt in enumerate(types):
        elems = int(rng.choice([256, 77 * 256, 8 * 16384, 8 * 16384 + 768, 17 * 16384 - 512, 150000]))
        data, n = random_blocks(qt, max(1, elems // type_info(qt).block_elems), rng, extreme=0.3)
        tensors.append(CodeTensor(f"blk.{i}.ffn_down.weight", qt, n, data))
        singles.append(CodeTensor(f"blk.{i}.ffn_down.weight", qt, n, data.copy()))
    before = [t._array.copy() for t in tensors]
    p32 = sigma_threshold(sigma)
    _native.set_backend(backend)
    try:
        one = [t.perturb(seed, p32) for t in singles]
        group = TensorGroup(tensors, threads)
        gp = group.perturb(seed, p32)
        for t, s, p, m, a in zip(tensors, singles, one, gp.masks, gp.applied):
            assert np.array_equal(t._array, s._array)
            assert np.array_equal(m[:p.mask.nbytes], p.mask) and a == p.applied
        gp.restore()
    finally:
        _native.set_backend("auto")
    for t, b in zip(tensors, before):
        assert np.array_equal(t._array, b)


def test_group_errors_name_the_tensor():
    rng = np.random.default_rng(4)
    ts = []
    for i in range(3):
        data, n = random_blocks(TRAINABLE[1], 600, rng)
        ts.append(CodeTensor(f"t{i}", TRAINABLE[1], n, data))
    with pytest.raises(QESError, match="distinct"):
        TensorGroup([ts[0], ts[1], ts[0]])
    g = TensorGroup(ts, 2)
    p32 = sigma_threshold(0.05)
    p = g.perturb(5, p32)
    with pytest.raises(QESError, match="another tensor group"):
        TensorGroup(ts[:2]).restore(p)
    # every tensor is checked before any is touched: a short mask for t1 fails the call, names t1
    perturbed = [t._array.copy() for t in ts]
    bad = GroupPerturbation(g, p.seed, p.threshold, [p.masks[0], p.masks[1][:1], p.masks[2]], p.applied)
    with pytest.raises(QESError, match="'t1'"):
        g.restore(bad)
    assert all(np.array_equal(t._array, b) for t, b in zip(ts, perturbed))
    p.restore()
    ro, n = random_blocks(TRAINABLE[1], 64, rng)
    ro.flags.writeable = False
    with pytest.raises(QESError, match="read-only"):
        TensorGroup([ts[0], CodeTensor("ro", TRAINABLE[1], n, ro)])
