"""From member rewards to the coefficients c_i of the update (floats; quantized once for the ledger).

The members come in mirrored pairs (+s, -s), adjacent.  Every scheme gives both members of a
pair with a failed member (NaN reward) coefficient 0 and scores the others without them.

- ``pairs`` (the default of new runs; the reference implementation's mirrored sampling, its
  ``zscore`` weighting): per valid pair k, d_k = r(+s_k) - r(-s_k);
  c_k = clip((d_k - mean(d)) / std(d), +-clip), 0 for all when std(d) is 0; +s_k gets +c_k and
  -s_k gets -c_k.  The paper's alpha values assume this normalisation.  With a single valid
  pair (a population of 2, or failures) c_k = sign(d_k).
- ``pairs-rank`` (the reference's ``rank`` weighting over the same d_k): the pair with the largest
  d_k gets +1, the smallest -1, linearly between (1 - 2 * rank / (n - 1), rank 0 the largest;
  ties get the mean of their weights); +s_k gets +w_k, -s_k gets -w_k; a single pair sign(d_k).
- ``zscore``: (r_i - mean) / std over the valid members, clipped to +-clip (runs before pairs).
- ``rank``: centered member ranks in [-0.5, 0.5], ties averaged.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("pairs", "pairs-rank", "zscore", "rank")
DEFAULT_SCHEME = "pairs"
#: the largest |c_i| a scheme gives, per member, bounding a step's sum of |c_i| (the engine's
#: 2^30 bound in Q16 is checked against population x this): a z-score's mean |z| is at most 1
#: (its mean square is 1), a pair weight at most 1, a centered rank 0.5
MEAN_ABS_BOUND = {"pairs": 1.0, "pairs-rank": 1.0, "zscore": 1.0, "rank": 0.5}


def _ranks(v: np.ndarray) -> np.ndarray:
    """0-based ranks of v in increasing order, ties given the mean of their ranks."""
    order = v.argsort(kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for val in np.unique(v):
        m = v == val
        ranks[m] = ranks[m].mean()
    return ranks


def coefficients(rewards: np.ndarray, scheme: str = DEFAULT_SCHEME, clip: float = 3.0) -> np.ndarray:
    """rewards: one per member, mirrored pairs adjacent (s, -s); NaN marks a failed member."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size % 2:
        raise ValueError("rewards must be one per member, in mirrored pairs")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown coefficient scheme {scheme!r}: {', '.join(SCHEMES)}")
    pair_ok = np.isfinite(r).reshape(-1, 2).all(axis=1)
    ok = np.repeat(pair_ok, 2)
    c = np.zeros_like(r)
    if scheme in ("pairs", "pairs-rank"):
        if pair_ok.sum() == 0:
            return c
        pairs = r.reshape(-1, 2)[pair_ok]
        d = pairs[:, 0] - pairs[:, 1]
        if len(d) == 1:  # a lone difference has no spread to normalise by: its sign
            w = np.sign(d)
        elif scheme == "pairs":
            sd = d.std()
            w = np.zeros_like(d) if sd == 0 else np.clip((d - d.mean()) / sd, -clip, clip)
        else:
            w = 2.0 * _ranks(d) / (len(d) - 1) - 1.0  # the largest +1, the smallest -1
        cp = np.zeros((len(pair_ok), 2))
        cp[pair_ok, 0], cp[pair_ok, 1] = w, -w
        return cp.reshape(-1)
    if ok.sum() < 2:
        return c
    v = r[ok]
    if scheme == "zscore":
        sd = v.std()
        c[ok] = 0.0 if sd == 0 else np.clip((v - v.mean()) / sd, -clip, clip)
    else:  # rank
        c[ok] = _ranks(v) / (len(v) - 1) - 0.5
    return c
