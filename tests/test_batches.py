"""Which examples a step sees: a pure function of (run seed, step); class-balanced when the task
has classes; and the prior-free AUROC the sentiment evaluation reports."""

import collections
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qes_edge.tasks.base import auroc
from qes_edge.training.config import TrainConfig
from qes_edge.training.trainer import batch_indices


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), batch=st.integers(1, 30),
       seed=st.integers(0, 2**32 - 1), step=st.integers(0, 10**6))
def test_balanced_batches(sizes, batch, seed, step):
    strata = [c for c, n in enumerate(sizes) for _ in range(n)]
    strata = [strata[i] for i in np.random.default_rng(seed).permutation(len(strata))]
    idx = batch_indices(seed, step, len(strata), batch, strata)
    assert np.array_equal(idx, batch_indices(seed, step, len(strata), batch, strata))  # replayable
    assert len(set(idx.tolist())) == len(idx) and all(0 <= i < len(strata) for i in idx)
    got = collections.Counter(strata[i] for i in idx)
    share = batch // len(sizes)
    for c, n in enumerate(sizes):
        # each class gets its share (or one more, for the remainder), unless it has fewer examples
        assert min(n, share) <= got[c] <= min(n, share + 1), (got, sizes, batch)
    if all(n >= share + 1 for n in sizes):
        assert len(idx) == batch


def test_balanced_batches_differ_between_steps_and_cover_both_classes():
    strata = ["negative"] * 300 + ["positive"] * 100
    seen = set()
    for step in range(20):
        idx = batch_indices(7, step, len(strata), 16, strata)
        assert collections.Counter(strata[i] for i in idx) == {"negative": 8, "positive": 8}
        seen.update(idx.tolist())
    assert len(seen) > 150  # not the same few examples every step (about 204 expected)


def test_label_count_must_match():
    with pytest.raises(ValueError, match="labels for"):
        batch_indices(0, 0, 10, 4, ["a"] * 9)


def test_old_ledgers_keep_random_batches():
    rec = TrainConfig().record()
    assert rec["balance"] is True and TrainConfig.from_record(rec).balance is True
    del rec["balance"]
    assert TrainConfig.from_record(rec).balance is False


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_auroc_is_the_pairwise_win_rate(rows):
    scores = np.array([s for s, _ in rows], float)
    pos = np.array([p for _, p in rows])
    pairs = [(a, b) for a, b in itertools.product(scores[pos], scores[~pos])]
    want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs]) if pairs else float("nan")
    got = auroc(scores, pos)
    assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want)


def test_auroc_ignores_a_shift_of_every_score():
    rng = np.random.default_rng(0)
    logit = rng.normal(size=200)
    pos = rng.random(200) < 0.5
    p = 1 / (1 + np.exp(-logit))
    shifted = 1 / (1 + np.exp(-(logit - 3)))  # a model that leans to "negative"
    assert auroc(p, pos) == pytest.approx(auroc(shifted, pos))


def test_sentiment_heldout_is_balanced_and_disjoint():
    pytest.importorskip("afinn")
    from qes_edge.tasks import load_task
    t = load_task("sentiment")
    held = collections.Counter(ex.answer for ex in t.heldout_examples())
    assert held == {"positive": 100, "negative": 100}
    words = lambda exs: {ex.meta["word"] for ex in exs}
    assert not words(t.heldout_examples()) & words(t.train_examples())
    assert t.strata() == [ex.answer for ex in t.train_examples()]
