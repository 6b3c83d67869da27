"""Fixed-point conversions, done once on the host when values enter the engine or the ledger.

Q16 coefficients and residuals (1.0 = 65536), Q14 decay.  Floats stop here: everything the
native code computes from these integers is bit-exact on every backend.
"""

from __future__ import annotations

import math

import numpy as np

Q16 = 1 << 16
Q14 = 1 << 14
#: |residual| bound of the contract (1.5 code units) in Q16
DEFAULT_CLAMP_Q16 = round(1.5 * Q16)
#: the engine's bound on a coefficient, and on the sum of a step's |coefficients|, in Q16 (qes.h)
COEF_BOUND_Q16 = 1 << 30


def coefs_to_q16(coefs, alpha: float, sigma: float) -> np.ndarray:
    """alpha/sigma * c_i in Q16, rounded to nearest (half away from zero)."""
    c = np.asarray(coefs, dtype=np.float64)
    if not np.all(np.isfinite(c)):
        raise ValueError("coefficients must be finite")
    if not (math.isfinite(alpha) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"alpha {alpha!r} and sigma {sigma!r} must be finite, sigma > 0")
    ratio = alpha / sigma
    if not math.isfinite(ratio):
        raise ValueError(f"alpha/sigma = {alpha!r}/{sigma!r} is not a finite number")
    scaled = c * ratio * Q16
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    if np.any(np.abs(q) > COEF_BOUND_Q16):
        raise ValueError("coefficients too large for Q16 (|alpha/sigma*c| must stay below 2^14)")
    return q.astype(np.int32)


def beta_to_q14(beta: float) -> int:
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    return int(math.floor(beta * Q14 + 0.5))


def clamp_to_q16(clamp: float) -> int:
    if not (math.isfinite(clamp) and 0.0 <= clamp < 2.0):
        raise ValueError(f"residual clamp must be in [0, 2) code units, got {clamp!r}")
    return int(math.floor(clamp * Q16 + 0.5))
