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
           clamp_q16=98304, anti_windup=True, stats=False):
    """steps: list of (seeds, coefs_q16, p32); the last is applied.  Returns (codes, residual, changed),
    and with stats=True (codes, residual, changed, dropped)."""
    codes = codes.astype(np.int64).copy()
    r = np.zeros(codes.size, np.int64) if residual is None else residual.astype(np.int64).copy()
    changed = dropped = 0
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
            dropped = int(np.count_nonzero(g != d))
            codes = codes + g
        r = np.clip(step - g * 65536, -clamp_q16, clamp_q16)
    if stats:
        return codes, r.astype(np.int32), changed, dropped
    return codes, r.astype(np.int32), changed

# --- section 4: the codes inside the blocks, from the spec's tables --------------------------
# A part is (byte(i), shift(i), width, code bit): `width` bits at bits shift.. of byte `byte` of
# the block hold the code's bits `code bit`..; i is the element's index inside its block.

def _legacy(qs_at, qh_at=None):
    parts = [(lambda i: qs_at + i % 16, lambda i: 4 * (i // 16), 4, 0)]
    if qh_at is not None:
        parts.append((lambda i: qh_at + i // 8, lambda i: i % 8, 1, 4))
    return parts


# name: (ggml type id, E, B, cmin, cmax, parts, f16 field offsets)
LAYOUTS = {
    "Q4_0": (2, 32, 18, 0, 15, _legacy(2), (0,)),
    "Q4_1": (3, 32, 20, 0, 15, _legacy(4), (0, 2)),
    "Q5_0": (6, 32, 22, 0, 31, _legacy(6, 2), (0,)),
    "Q5_1": (7, 32, 24, 0, 31, _legacy(8, 4), (0, 2)),
    "Q8_0": (8, 32, 34, -128, 127, [(lambda i: 2 + i, lambda i: 0 * i, 8, 0)], (0,)),
    # i = 128h + 32q + l
    "Q2_K": (10, 256, 84, 0, 3,
             [(lambda i: 16 + 32 * (i // 128) + i % 32, lambda i: 2 * ((i // 32) % 4), 2, 0)], (80, 82)),
    "Q3_K": (11, 256, 110, 0, 7,
             [(lambda i: 32 + 32 * (i // 128) + i % 32, lambda i: 2 * ((i // 32) % 4), 2, 0),
              (lambda i: i % 32, lambda i: i // 32, 1, 2)], (108,)),
    # i = 64g + 32k + l
    "Q4_K": (12, 256, 144, 0, 15,
             [(lambda i: 16 + 32 * (i // 64) + i % 32, lambda i: 4 * ((i // 32) % 2), 4, 0)], (0, 2)),
    "Q5_K": (13, 256, 176, 0, 31,
             [(lambda i: 48 + 32 * (i // 64) + i % 32, lambda i: 4 * ((i // 32) % 2), 4, 0),
              (lambda i: 16 + i % 32, lambda i: i // 32, 1, 4)], (0, 2)),
    # i = 128h + 32q + l
    "Q6_K": (14, 256, 210, 0, 63,
             [(lambda i: 64 * (i // 128) + 32 * ((i // 32) % 2) + i % 32, lambda i: 4 * (((i // 32) % 4) // 2), 4, 0),
              (lambda i: 128 + 32 * (i // 128) + i % 32, lambda i: 2 * ((i // 32) % 4), 2, 4)], (208,)),
}
TYPE_NAMES = tuple(LAYOUTS)


def layout(qtype: str):
    tid, E, B, cmin, cmax, parts, f16 = LAYOUTS[qtype]
    return {"id": tid, "E": E, "B": B, "cmin": cmin, "cmax": cmax, "parts": parts, "f16": f16}


def _blocks(qtype: str, data) -> np.ndarray:
    L = layout(qtype)
    d = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if d.size % L["B"]:
        raise ValueError(f"{d.size} bytes is not a whole number of {qtype} blocks")
    return d.reshape(-1, L["B"])


def code_get(qtype: str, data) -> np.ndarray:
    """Codes of every element (int64), in tensor order."""
    L = layout(qtype)
    blk = _blocks(qtype, data).astype(np.int64)
    out = np.zeros((blk.shape[0], L["E"]), np.int64)
    for i in range(L["E"]):
        for byte, shift, width, cbit in L["parts"]:
            out[:, i] |= ((blk[:, byte(i)] >> shift(i)) & ((1 << width) - 1)) << cbit
    if L["cmin"] < 0:  # Q8_0: two's complement byte
        out = np.where(out >= 128, out - 256, out)
    return out.reshape(-1)


def code_set(qtype: str, data, codes) -> np.ndarray:
    """A copy of the bytes with every element's code replaced by `codes` (tensor order)."""
    L = layout(qtype)
    blk = _blocks(qtype, data).astype(np.int64).copy()
    v = np.asarray(codes, dtype=np.int64).reshape(blk.shape[0], L["E"])
    if v.min() < L["cmin"] or v.max() > L["cmax"]:
        raise ValueError(f"{qtype} codes must lie in [{L['cmin']}, {L['cmax']}]")
    v = v & 0xFF if L["cmin"] < 0 else v
    for i in range(L["E"]):
        for byte, shift, width, cbit in L["parts"]:
            m = ((1 << width) - 1) << shift(i)
            blk[:, byte(i)] = (blk[:, byte(i)] & ~m) | (((v[:, i] >> cbit) & ((1 << width) - 1)) << shift(i))
    return blk.astype(np.uint8).reshape(-1)


def _f16(blk: np.ndarray, at: int) -> np.ndarray:
    return blk[:, at:at + 2].copy().view("<f2").reshape(-1).astype(np.float32)


def _sub_scales(qtype: str, blk: np.ndarray) -> np.ndarray:
    """The integer scale that multiplies the level of each sub-block (section 4.3)."""
    s = blk.astype(np.int64)
    if qtype == "Q2_K":
        return s[:, 0:16] & 15
    if qtype == "Q3_K":
        q = s[:, 96:108]
        out = []
        for j in range(16):
            lo = q[:, j] & 15 if j < 8 else q[:, j - 8] >> 4
            hi = (q[:, 8 + j % 4] >> (2 * (j // 4))) & 3
            out.append((lo | (hi << 4)) - 32)
        return np.stack(out, axis=1)
    if qtype in ("Q4_K", "Q5_K"):
        q = s[:, 4:16]
        return np.stack([q[:, j] & 63 if j < 4 else (q[:, j + 4] & 15) | ((q[:, j - 4] >> 6) << 4)
                         for j in range(8)], axis=1)
    if qtype == "Q6_K":
        return np.where(s[:, 192:208] >= 128, s[:, 192:208] - 256, s[:, 192:208])
    raise ValueError(qtype)


def levels(qtype: str, data) -> np.ndarray:
    """Level of every element (section 4.4): d, or d times its sub-block scale (float32)."""
    L = layout(qtype)
    blk = _blocks(qtype, data)
    if L["E"] == 32:
        return np.repeat(_f16(blk, 0), 32)
    d = _f16(blk, L["f16"][0])
    sc = _sub_scales(qtype, blk).astype(np.float32)
    per = 256 // sc.shape[1]
    return (d[:, None] * np.repeat(sc, per, axis=1)).reshape(-1)


# --- section 5: perturb / restore on bytes, with the applied mask ----------------------------

def max_draws(p32: int) -> int:
    return (p32 >> (32 - CHUNK_BITS)) + 1


def mask_bytes(n: int, p32: int) -> int:
    return ((n + CHUNK - 1) // CHUNK * max_draws(p32) + 7) // 8


def noise_bits(name: str, n: int, seed: int, p32: int):
    """The listing of section 3 with each draw's mask bit number c*maxdraws + j."""
    tid = fnv1a64(name.encode())
    abs_seed, sgn = abs(seed), (1 if seed > 0 else -1)
    pos, sign, bits = [], [], []
    for c in range((n + CHUNK - 1) // CHUNK):
        k = chunk_key(tid, abs_seed, c)
        draws = (p32 >> 18) + (1 if int(mix32(k["count"])) < ((p32 << 14) & M32) else 0)
        j = np.arange(draws, dtype=np.int64)
        x = perm(k, j.astype(np.uint32)).astype(np.int64)
        keep = c * CHUNK + x < n
        j, x = j[keep], x[keep]
        hi = (mix32(x.astype(np.uint32) ^ np.uint32(k["sign"])) >> np.uint32(31)).astype(np.int64)
        pos.append(c * CHUNK + x)
        sign.append(np.where(hi == 1, sgn, -sgn))
        bits.append(c * max_draws(p32) + j)
    return np.concatenate(pos), np.concatenate(sign), np.concatenate(bits)


def perturb_bytes(qtype: str, data, name: str, seed: int, p32: int):
    """(perturbed bytes, applied mask bytes, applied count) of section 5."""
    L = layout(qtype)
    codes = code_get(qtype, data)
    pos, sign, bits = noise_bits(name, codes.size, seed, p32)
    new = codes[pos] + sign
    ok = (new >= L["cmin"]) & (new <= L["cmax"])
    codes[pos[ok]] = new[ok]
    mask = np.zeros(mask_bytes(codes.size, p32), np.uint8)
    for b in bits[ok]:  # LSB-first
        mask[b >> 3] |= np.uint8(1 << (b & 7))
    return code_set(qtype, data, codes), mask, int(ok.sum())


def restore_bytes(qtype: str, data, name: str, seed: int, p32: int, mask) -> np.ndarray:
    L = layout(qtype)
    codes = code_get(qtype, data)
    mask = np.frombuffer(bytes(mask), np.uint8)
    if mask.size < mask_bytes(codes.size, p32):
        raise ValueError("mask too short")
    pos, sign, bits = noise_bits(name, codes.size, seed, p32)
    on = ((mask[bits >> 3] >> (bits & 7)) & 1) == 1
    old = codes[pos[on]] - sign[on]
    if np.any((old < L["cmin"]) | (old > L["cmax"])):
        raise ValueError("mask does not belong to this perturbation")
    codes[pos[on]] = old
    return code_set(qtype, data, codes)


# --- section 6: update on bytes, and the host-side fixed point --------------------------------

def update_bytes(qtype: str, data, name: str, steps, residual=None, beta_q14=14746, clamp_q16=98304,
                 anti_windup=True):
    """(bytes, residual, changed, dropped) of an update; steps as for update()."""
    L = layout(qtype)
    codes, r, changed, dropped = update(code_get(qtype, data), L["cmin"], L["cmax"], name, steps, residual,
                                        beta_q14, clamp_q16, anti_windup, stats=True)
    return code_set(qtype, data, codes), r, changed, dropped


def beta_to_q14(beta: float) -> int:
    """6.1: floor(beta * 16384 + 0.5) in double precision, beta finite in [0, 1]."""
    beta = float(beta)
    if not (beta == beta and 0.0 <= beta <= 1.0):
        raise ValueError("beta")
    return int(np.floor(beta * 16384.0 + 0.5))


def coefs_to_q16(coefs, alpha: float, sigma: float) -> list[int]:
    """6.1: sign(x) * floor(|x| + 0.5), x = c * (alpha / sigma) * 65536 in double precision."""
    alpha, sigma = float(alpha), float(sigma)
    if not (np.isfinite(alpha) and np.isfinite(sigma) and sigma > 0):
        raise ValueError("alpha/sigma")
    t = alpha / sigma
    if not np.isfinite(t):
        raise ValueError("alpha / sigma overflows")
    out = []
    for c in coefs:
        c = float(c)
        if not np.isfinite(c):
            raise ValueError("coefficient")
        x = (c * t) * 65536.0
        q = np.floor(abs(x) + 0.5)
        out.append(int(q) if x >= 0 else -int(q))
    if any(abs(q) > 2**30 for q in out):
        raise ValueError("coefficients too large")
    return out


# --- section 8: the weights hash ---------------------------------------------------------------

def weights_digest(tensors) -> str:
    """tensors: (name, raw block bytes) in training order."""
    import hashlib
    h = hashlib.sha256()
    for name, data in tensors:
        h.update(name.encode("utf-8"))
        h.update(bytes(data))
    return h.hexdigest()
