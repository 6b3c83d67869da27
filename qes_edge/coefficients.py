"""From member rewards to the coefficients c_i of the update (floats; quantized once for the ledger)."""

from __future__ import annotations

import numpy as np

SCHEMES = ("zscore", "rank")


def coefficients(rewards: np.ndarray, scheme: str = "zscore", clip: float = 3.0) -> np.ndarray:
    """rewards: one per member, mirrored pairs adjacent (s, -s).  NaN marks a failed member: both
    members of its pair get coefficient 0 and the others are scored without them.

    zscore: (r - mean) / std over the valid members, clipped to +-clip (the paper's default);
    rank: centered ranks in [-0.5, 0.5] (ties averaged)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size % 2:
        raise ValueError("rewards must be one per member, in mirrored pairs")
    pair_ok = np.isfinite(r).reshape(-1, 2).all(axis=1)
    ok = np.repeat(pair_ok, 2)
    c = np.zeros_like(r)
    if ok.sum() < 2:
        return c
    v = r[ok]
    if scheme == "zscore":
        sd = v.std()
        c[ok] = 0.0 if sd == 0 else np.clip((v - v.mean()) / sd, -clip, clip)
    elif scheme == "rank":
        order = v.argsort(kind="stable")
        ranks = np.empty(len(v))
        ranks[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ties
            m = v == val
            ranks[m] = ranks[m].mean()
        c[ok] = ranks / (len(v) - 1) - 0.5
    else:
        raise ValueError(f"unknown coefficient scheme {scheme!r}: {', '.join(SCHEMES)}")
    return c
