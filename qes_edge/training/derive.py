"""What a step draws from (run seed, step): its member seeds and its training examples.

Integer-only and counter-based, like the noise (docs/ledger-spec.md, "Derivation v2"), so that
another implementation re-runs a run from the spec alone: no library RNG stream, whose
algorithm may change with its version.  A stream is keyed by (run seed, step, stream id) and
yields u64 values u_0, u_1, ... in order; `below(m)` maps the next one to [0, m) by
floor(u * m / 2^64) (bias at most m / 2^64).

Ledgers written before this derivation (config without "derive") used NumPy's Generator;
:mod:`qes_edge.training.trainer` keeps that path so that they resume exactly as they were recorded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
SEED_STREAM = 1
BATCH_STREAM = 2
SEED_MAX = 2**31 - 1


def mix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class Stream:
    """u_i = mix64(K + i), K = mix64(mix64(run_seed xor stream*G) + step), all mod 2^64."""

    def __init__(self, run_seed: int, step: int, stream: int):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.key = mix64(mix64((run_seed & M64) ^ ((stream * GOLDEN) & M64)) + step)
        self.i = 0

    def next(self) -> int:
        u = mix64(self.key + self.i)
        self.i += 1
        return u

    def below(self, m: int) -> int:
        if m < 1:
            raise ValueError("below(m) needs m >= 1")
        return (self.next() * m) >> 64

    def take(self, items: list, k: int) -> list:
        """The first k of a partial Fisher-Yates shuffle of items (a copy): for i < k, swap
        item i with item i + below(n - i)."""
        a = list(items)
        for i in range(min(k, len(a))):
            j = i + self.below(len(a) - i)
            a[i], a[j] = a[j], a[i]
        return a[:min(k, len(a))]


def member_seeds(run_seed: int, step: int, population: int) -> np.ndarray:
    """Mirrored pairs [b_0, -b_0, b_1, -b_1, ...] with b_k = 1 + below(2^31 - 2): |seed| in
    [1, 2^31 - 2], the first population/2 values of the seed stream."""
    st = Stream(run_seed, step, SEED_STREAM)
    bases = [1 + st.below(SEED_MAX - 1) for _ in range(population // 2)]
    return np.stack([np.asarray(bases, np.int64), -np.asarray(bases, np.int64)], axis=1).reshape(-1)


def batch_indices(run_seed: int, step: int, n_examples: int, batch: int, strata: Sequence | None = None) -> np.ndarray:
    """The step's training examples (indices into the task's training list), from the batch stream.

    Without classes: the first min(batch, n) of a partial Fisher-Yates shuffle of 0..n-1.
    With a class label per example: labels ordered by str(label); each class gets batch // L
    (L classes) and the batch % L classes picked by a partial shuffle of the label order get one
    more; each class, in label order, gives the first min(share, size) of a partial shuffle of its
    examples (in example order); the concatenation is then shuffled in full.  One stream, drawn
    in exactly that order."""
    st = Stream(run_seed, step, BATCH_STREAM)
    if strata is None:
        return np.asarray(st.take(list(range(n_examples)), batch), dtype=np.int64)
    if len(strata) != n_examples:
        raise ValueError(f"{len(strata)} class labels for {n_examples} examples")
    labels = sorted(set(strata), key=str)
    if len({str(x) for x in labels}) != len(labels):
        raise ValueError("class labels must differ in their text")
    extra = set(st.take(list(range(len(labels))), batch % len(labels)))
    picked: list[int] = []
    for c, label in enumerate(labels):
        members = [i for i, s in enumerate(strata) if s == label]
        picked += st.take(members, batch // len(labels) + (1 if c in extra else 0))
    return np.asarray(st.take(picked, len(picked)), dtype=np.int64)
