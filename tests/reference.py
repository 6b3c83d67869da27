"""A small NumPy reference of the QES engine, written from docs/noise-spec.md alone.

It shares no code with libqes: the tests compare the two bit for bit.  Slow but plain.
"""

from __future__ import annotations

import numpy as np

M32 = (1 << 32) - 1
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
CHUNK_BITS = 14
CHUNK = 1 << CHUNK_BITS
SQRT_2_OVER_PI = 0.79788456080286535588


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix32(x):
    with np.errstate(over="ignore"):
        return _mix32(np.asarray(x, dtype=np.uint32))


def _mix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def sigma_threshold(sigma: float) -> int:
    return int(np.floor(sigma * SQRT_2_OVER_PI * 4294967296.0))


def chunk_key(tid: int, abs_seed: int, chunk: int) -> dict:
    K = mix64((mix64(tid ^ ((abs_seed * GOLDEN) & M64)) + chunk) & M64)
    L = mix64(K ^ GOLDEN)
    return {"a": (K & M32) | 1, "b": K >> 32, "c": ((L >> 16) & M32) | 1, "d": (L >> 40) & M32,
            "sign": L & M32, "count": L >> 32}


def perm(k: dict, j: np.ndarray) -> np.ndarray:
    mask = np.uint32(CHUNK - 1)
    x = j.astype(np.uint32)
    x = (x * np.uint32(k["a"]) + np.uint32(k["b"])) & mask
    x ^= x >> np.uint32(7)
    x = (x * np.uint32(k["c"]) + np.uint32(k["d"])) & mask
    x ^= x >> np.uint32(6)
    x = (x * np.uint32(0x2C1B3C6D)) & mask
    x ^= x >> np.uint32(7)
    return x


def noise(name: str, n: int, seed: int, p32: int) -> tuple[np.ndarray, np.ndarray]:
    """Element indices and +-1 of (tensor name, seed), in spec order."""
    tid = fnv1a64(name.encode())
    abs_seed, sgn = abs(seed), (1 if seed > 0 else -1)
    pos_all, sign_all = [], []
    for c in range((n + CHUNK - 1) // CHUNK):
        k = chunk_key(tid, abs_seed, c)
        frac = (p32 << CHUNK_BITS) & M32
        draws = (p32 >> (32 - CHUNK_BITS)) + (1 if int(mix32(k["count"])) < frac else 0)
        x = perm(k, np.arange(draws, dtype=np.uint32))
        x = x[x < min(CHUNK, n - c * CHUNK)]
        bit = mix32(x ^ np.uint32(k["sign"])) >> np.uint32(31)
        pos_all.append(x.astype(np.uint64) + np.uint64(c * CHUNK))
        sign_all.append(np.where(bit == 1, sgn, -sgn).astype(np.int8))
    return np.concatenate(pos_all), np.concatenate(sign_all)


def perturb(codes: np.ndarray, cmin: int, cmax: int, name: str, seed: int, p32: int) -> np.ndarray:
    """Perturbed codes with boundary gating (codes that would leave [cmin, cmax] stay)."""
    pos, sign = noise(name, codes.size, seed, p32)
    out = codes.astype(np.int64).copy()
    new = out[pos.astype(np.int64)] + sign
    ok = (new >= cmin) & (new <= cmax)
    out[pos[ok].astype(np.int64)] = new[ok]
    return out


def update(codes: np.ndarray, cmin: int, cmax: int, name: str, steps, residual=None, beta_q14=14746,
           clamp_q16=98304, anti_windup=True):
    """steps: list of (seeds, coefs_q16, p32); the last is applied.  Returns (codes, residual, changed)."""
    codes = codes.astype(np.int64).copy()
    r = np.zeros(codes.size, np.int64) if residual is None else residual.astype(np.int64).copy()
    changed = 0
    for s, (seeds, coefs, p32) in enumerate(steps):
        acc = np.zeros(codes.size, np.int64)
        for seed, coef in zip(seeds, coefs):
            pos, sign = noise(name, codes.size, int(seed), int(p32))
            acc[pos.astype(np.int64)] += sign.astype(np.int64) * int(coef)   # no repeats within a member
        step = acc + ((beta_q14 * r + (1 << 13)) >> 14)
        d = (step + (1 << 15)) >> 16
        new = codes + d
        inside = (new >= cmin) & (new <= cmax)
        g = np.where(inside, d, 0 if anti_windup else np.clip(new, cmin, cmax) - codes)
        if s == len(steps) - 1:
            changed = int(np.count_nonzero(g))
            codes = codes + g
        r = np.clip(step - g * 65536, -clamp_q16, clamp_q16)
    return codes, r.astype(np.int32), changed
