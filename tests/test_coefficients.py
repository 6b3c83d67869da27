"""The coefficient schemes against a transcription of docs/ledger-spec.md §5 written as plain
loops (the reference implementation's mirrored-sampling formulas, github
dibbla/Quantized-Evolution-Strategies `int4_perturb.py`, read and restated there), on random
rewards with failed members and ties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qes_edge.training.coefficients import DEFAULT_SCHEME, SCHEMES, coefficients
from qes_edge.training.config import TrainConfig


def spec_pairs(rewards, clip=3.0, rank=False, eps=0.0):
    """ledger-spec §5, step 4, `pairs` / `pairs-rank`, one member at a time.  eps: the reference
    adds 1e-8 to the standard deviation (ours does not: 0 for all when it is 0)."""
    n_pairs = len(rewards) // 2
    valid = [k for k in range(n_pairs) if not (math.isnan(rewards[2 * k]) or math.isnan(rewards[2 * k + 1]))]
    out = [0.0] * len(rewards)
    if not valid:
        return out
    d = {k: rewards[2 * k] - rewards[2 * k + 1] for k in valid}
    if len(valid) == 1:  # a lone pair: the sign of its difference
        (k,) = valid
        c = (d[k] > 0) - (d[k] < 0)
        out[2 * k], out[2 * k + 1] = float(c), float(-c)
        return out
    if rank:
        # the reference: sort descending (stable), rank 0 the best, weight 1 - 2 rank / (n - 1);
        # tied values share the mean of their weights
        order = sorted(valid, key=lambda k: -d[k])
        weight = {k: 1 - 2 * i / (len(valid) - 1) for i, k in enumerate(order)}
        for k in valid:
            tied = [j for j in valid if d[j] == d[k]]
            c = sum(weight[j] for j in tied) / len(tied)
            out[2 * k], out[2 * k + 1] = c, -c
        return out
    mean = sum(d.values()) / len(valid)
    std = math.sqrt(sum((x - mean) ** 2 for x in d.values()) / len(valid))
    for k in valid:
        if std + eps == 0:
            c = 0.0
        else:
            c = max(-clip, min(clip, (d[k] - mean) / (std + eps)))
        out[2 * k], out[2 * k + 1] = c, -c
    return out


rewards_st = st.integers(2, 25).flatmap(lambda n: st.lists(
    st.one_of(st.floats(0, 1, allow_nan=False), st.sampled_from([0.0, 0.5, 1.0, float("nan")])),
    min_size=2 * n, max_size=2 * n))


@settings(max_examples=300, deadline=None)
@given(r=rewards_st, clip=st.sampled_from([1.0, 2.0, 3.0]))
def test_pairs_is_the_spec(r, clip):
    got = coefficients(np.array(r), "pairs", clip)
    want = np.array(spec_pairs(r, clip))
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(got[0::2], -got[1::2])  # +s gets +c_k, -s gets -c_k


@settings(max_examples=300, deadline=None)
@given(r=rewards_st)
def test_pairs_rank_is_the_spec(r):
    got = coefficients(np.array(r), "pairs-rank")
    assert np.allclose(got, spec_pairs(r, rank=True), rtol=1e-12, atol=1e-12)
    assert np.all(np.abs(got) <= 1.0) and np.array_equal(got[0::2], -got[1::2])


def test_pairs_agrees_with_the_reference_epsilon_where_the_spread_is_real():
    rng = np.random.default_rng(1)
    for _ in range(200):
        r = rng.random(16) * 0.05 + 0.45
        assert np.allclose(coefficients(r, "pairs"), spec_pairs(list(r), eps=1e-8), atol=1e-5)


def test_a_measured_step_pairs_is_not_member_zscores():
    """Rewards in the range of a measured step (16 members, 0.481-0.499; the numbers here are
    made up): member z-scores are neither centred on the pair differences nor of their scale,
    and some members' coefficients change sign between the two schemes."""
    r = np.array([0.4905, 0.4866, 0.4951, 0.4884, 0.4812, 0.4899, 0.4987, 0.4930,
                  0.4893, 0.4890, 0.4842, 0.4926, 0.4958, 0.4874, 0.4909, 0.4861])
    p, z = coefficients(r, "pairs"), coefficients(r, "zscore")
    d = r[0::2] - r[1::2]
    assert np.allclose(p[0::2], (d - d.mean()) / d.std())
    assert not np.allclose(p, z) and np.any(np.sign(p) != np.sign(z))


def test_failed_pairs_and_no_spread():
    r = np.array([0.9, np.nan, 0.1, 0.4, 0.6, 0.2, 0.5, 0.5])
    for scheme in SCHEMES:
        c = coefficients(r, scheme)
        assert c[0] == 0 and c[1] == 0, scheme
    assert np.all(coefficients(np.array([0.5, 0.25, 0.75, 0.5]), "pairs") == 0)  # equal differences: no signal
    lone = np.array([0.2, np.nan, 0.7, 0.6])  # one valid pair: the sign of its difference
    assert list(coefficients(lone, "pairs")) == list(coefficients(lone, "pairs-rank")) == [0, 0, 1, -1]
    assert list(coefficients(np.array([0.3, 0.5]), "pairs")) == [-1, 1]  # a population of 2
    assert np.all(coefficients(np.array([0.2, np.nan, np.nan, 0.6]), "pairs") == 0)  # no valid pair
    with pytest.raises(ValueError, match="unknown coefficient scheme"):
        coefficients(r, "ranks")


def test_new_runs_use_pairs_and_old_records_keep_theirs():
    assert TrainConfig().coef_scheme == DEFAULT_SCHEME == "pairs"
    rec = TrainConfig().record()
    assert TrainConfig.from_record(rec).coef_scheme == "pairs"
    old = {k: v for k, v in rec.items() if k != "coef_scheme"}
    assert TrainConfig.from_record(old).coef_scheme == "zscore"  # written before the scheme was recorded
    assert TrainConfig.from_record({**rec, "coef_scheme": "rank"}).coef_scheme == "rank"
    for scheme in SCHEMES:
        TrainConfig(coef_scheme=scheme).validate()
    with pytest.raises(ValueError, match="coefficient scheme must be one of pairs, pairs-rank, zscore, rank"):
        TrainConfig(coef_scheme="ranks").validate()
