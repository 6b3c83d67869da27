"""Write docs/noise-golden.json from the NumPy reference (not from libqes).

    python tests/make_golden.py

Run it only when the noise spec version changes; the tests check libqes and the reference
against the committed file."""

import hashlib
import re
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

CASES = [
    ("blk.0.ffn_up.weight", 884736, 1, 0.01),
    ("blk.0.ffn_up.weight", 884736, -1, 0.01),
    ("blk.0.attn_q.weight", 331776, 2147483647, 0.001),
    ("token_embd.weight", 28311552, 42, 0.005),
    ("blk.29.ffn_down.weight", 16416, -777, 0.5),
    ("é", 32, 3, 0.3),
]


def digest(pos, sign) -> str:
    """sha256 over the draws as little-endian (uint64 element, int8 sign) records."""
    rec = np.empty(len(pos), dtype=[("pos", "<u8"), ("sign", "i1")])
    rec["pos"], rec["sign"] = pos, sign
    return hashlib.sha256(rec.tobytes()).hexdigest()


def build():
    out = {"spec_version": 1, "hash": {"fnv1a64": {}}, "mix": {}, "cases": []}
    for name in ["", "a", "blk.0.ffn_up.weight", "é"]:
        out["hash"]["fnv1a64"][name] = f"{R.fnv1a64(name.encode()):016x}"
    out["mix"]["mix32"] = {str(x): int(R.mix32(x)) for x in [0, 1, 0xDEADBEEF]}
    out["mix"]["mix64"] = {str(x): f"{R.mix64(x):016x}" for x in [0, 1, 0x0123456789ABCDEF]}
    for name, n, seed, sigma in CASES:
        p32 = R.sigma_threshold(sigma)
        pos, sign = R.noise(name, n, seed, p32)
        out["cases"].append({
            "tensor": name, "n_elements": n, "seed": seed, "sigma": sigma, "p32": p32,
            "count": int(len(pos)),
            "first": [[int(p), int(s)] for p, s in zip(pos[:12], sign[:12])],
            "sha256": digest(pos, sign),
        })
    return out


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "noise-golden.json"
    text = json.dumps(build(), indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+(-?\d+),\s+(-?\d+)\s+\]", r"[\1, \2]", text)  # one draw per line
    path.write_text(text + "\n")
    print(path)
