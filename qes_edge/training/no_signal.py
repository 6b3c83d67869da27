"""Steps that carry no signal: every member scored the same (or every mirrored pair differed by
the same amount), so the coefficients are all zero and the step moves nothing.  A few such
steps happen; many in a row mean the run is not learning, and the likely cause is named so
the user can act on it (a saturated reward, a batch too small to resolve the perturbations, a
sigma too small to change the reward).

The trainer records the diagnosis in the step's timings (`no_signal`, covered by the row's
hash); `train`, the daemon's log and events, `status` and `report` show a streak of them."""

from __future__ import annotations

import numpy as np

#: this many no-signal steps in a row are shown as an alarm, not only as a per-step note
STREAK = 3
KEY = "no_signal"


def right_wrong(values: np.ndarray, batch: int) -> bool:
    """Every reward is a multiple of 1/batch: a mean of per-prompt right/wrong (0/1) scores."""
    if batch < 1:
        return False
    k = np.asarray(values, float) * batch
    return bool(np.all(np.abs(k - np.round(k)) < 1e-9))


def diagnose(rewards, coefs_q16, batch: int) -> str | None:
    """The likely cause when a step moves nothing, else None: its quantized coefficients are all
    zero, or every mirrored pair scored the same on both sides (then +s and -s get the same
    coefficient under any member scheme and their noise cancels)."""
    r = np.asarray(rewards, np.float64)
    pairs = r.reshape(-1, 2)
    ok = np.isfinite(pairs).all(axis=1)
    valid = pairs[ok]
    no_pair_signal = len(valid) > 0 and bool(np.all(valid[:, 0] == valid[:, 1]))
    if np.any(np.asarray(coefs_q16) != 0) and not no_pair_signal:
        return None
    if len(valid) == 0:
        return "no mirrored pair scored: a member of each failed its reward"
    v = valid.reshape(-1)
    if np.all(v == v[0]):
        if v[0] in (0.0, 1.0):
            return f"the reward is saturated: every member scored {v[0]:g} on the batch"
        if right_wrong(v, batch):
            return (f"every member scored {v[0]:.4g}: each reward is a mean of {batch} right/wrong scores, "
                    "too few to tell the perturbations apart (raise --batch)")
        return (f"every member scored {v[0]:.4g}: sigma is too small to change the reward, or the reward "
                "does not depend on the model's output")
    d = valid[:, 0] - valid[:, 1]
    if len(d) > 1 and np.all(d == d[0]):
        if right_wrong(v, batch):
            return (f"every mirrored pair differed by {d[0]:+.4g}: right/wrong scores over {batch} prompts are "
                    "too coarse for these perturbations (raise --batch or sigma)")
        return f"every mirrored pair differed by {d[0]:+.4g}: sigma is too small to change the reward"
    return "every coefficient rounds to 0 in Q16: alpha / sigma is too small"


def streak(timings_seq) -> tuple[int, str | None]:
    """The no-signal steps at the end of a run's steps (their timings, in order) and the last one's
    cause."""
    n, cause = 0, None
    for t in reversed(list(timings_seq)):
        c = (t or {}).get(KEY)
        if not c:
            break
        n += 1
        cause = cause or c
    return n, cause


def alarm(n: int, cause: str | None) -> str | None:
    """The line shown for a streak of n no-signal steps, None below STREAK."""
    if n < STREAK:
        return None
    return f"no signal for the last {n} steps: {cause}"
