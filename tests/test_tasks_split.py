"""The tasks' fixed train/held-out split: fixed_permutation is NumPy's default_rng(seed).permutation,
element for element (it replaced it to keep numpy.random out of a training process)."""

import random

import numpy as np

from qes_edge.tasks.base import fixed_permutation


def test_fixed_permutation_is_numpys():
    r = random.Random(7)
    cases = [(12345, 3382), (999, 10), (999, 1), (999, 0), (0, 2), (0, 5000), (2**32 + 5, 777), (2**70 + 3, 1234)]
    cases += [(r.choice([r.randrange(100), r.randrange(2**32), r.randrange(2**64), r.randrange(2**130)]),
               r.randrange(0, 6000)) for _ in range(60)]
    for seed, n in cases:
        assert fixed_permutation(seed, n) == np.random.default_rng(seed).permutation(n).tolist(), (seed, n)


def test_sentiment_split_unchanged():
    from qes_edge.tasks.sentiment import SentimentTask, afinn_words
    words = afinn_words(2)
    order = np.random.default_rng(12345).permutation(len(words))
    held = set()
    for label in ("positive", "negative"):
        held.update([i for i in order if words[i][1] == label][:100])
    t = SentimentTask()
    assert [ex.meta["word"] for ex in t.heldout_examples()] == [words[i][0] for i in order if i in held]
    assert [ex.meta["word"] for ex in t.train_examples()] == [words[i][0] for i in order if i not in held]
