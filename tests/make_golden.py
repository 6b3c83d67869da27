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


def stream(label: str, nbytes: int) -> np.ndarray:
    """sha256(label || le32(0)) || sha256(label || le32(1)) || ... cut to nbytes: portable test input."""
    out = bytearray()
    i = 0
    while len(out) < nbytes:
        out += hashlib.sha256(label.encode() + i.to_bytes(4, "little")).digest()
        i += 1
    return np.frombuffer(bytes(out[:nbytes]), dtype=np.uint8).copy()


def ints(label: str, count: int, lo: int, hi: int) -> np.ndarray:
    """count integers in [lo, hi] from the stream."""
    return lo + stream(label, 4 * count).view("<u4").astype(np.int64) % (hi - lo + 1)


def with_ends(label: str, qtype: str, data: np.ndarray, percent: int) -> np.ndarray:
    """The bytes with about `percent`% of the codes at cmin or cmax and the others random."""
    L = R.layout(qtype)
    n = data.size // L["B"] * L["E"]
    ends = np.where(ints(label + "/side", n, 0, 1) == 0, L["cmin"], L["cmax"])
    codes = np.where(ints(label + "/pick", n, 0, 99) < percent, ends, ints(label + "/code", n, L["cmin"], L["cmax"]))
    return R.code_set(qtype, data, codes)


NICE_F16 = [0.25, 0.5, 1.0, 2.0, -0.5, 0.125, 4.0, -1.0]


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def res_sha(r) -> str:
    return sha(np.asarray(r, dtype="<i4").tobytes())


def blocks_for(qtype: str, n: int) -> int:
    return n // R.layout(qtype)["E"]


def build_fixed_point():
    betas = [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0, 1 / 32768, 3 / 32768, 0.49999999999999994 / 16384]
    accepted = [
        ([1.0, -1.0, 3.0, -3.0, 0.0, 0.5, -0.5, 5.0, -5.0], 1.0, 131072.0),   # exact halves: away from zero
        ([-3.0, -1.2345, 0.001, 0.7, 2.5, 3.0], 0.001, 0.01),
        ([1.0, -1.0], 0.002, 0.01),
        ([0.3, -2.9, 1e-9], 0.00125, 0.005),
        ([1.5, -0.25], -0.001, 0.02),                                       # alpha may be negative
        ([16384.0, -16384.0], 1.0, 1.0),                                    # |q| = 2^30 is accepted
        ([0.49999999999999994 / 65536], 1.0, 1.0),                          # the double addition rounds up
    ]
    refused = [([16384.00001], 1.0, 1.0), ([1.0], 1.0, 0.0), ([1.0], 1.0, -0.01), ([40000.0], 0.5, 1.0)]
    return {
        "beta_q14": [[b, R.beta_to_q14(b)] for b in betas],
        "coefs_q16": [{"coefs": c, "alpha": a, "sigma": s, "q16": R.coefs_to_q16(c, a, s)} for c, a, s in accepted],
        "coefs_q16_refused": [{"coefs": c, "alpha": a, "sigma": s} for c, a, s in refused],
    }


def build_codecs():
    out = []
    for t in R.TYPE_NAMES:
        L = R.layout(t)
        nb = 2 if L["E"] == 32 else 1
        label = f"codecs/{t}"
        data = stream(label, nb * L["B"]).reshape(nb, L["B"])
        pick = ints(label + "/f16", nb * len(L["f16"]), 0, len(NICE_F16) - 1).reshape(nb, -1)
        for b in range(nb):
            for k, at in enumerate(L["f16"]):
                data[b, at:at + 2] = np.frombuffer(np.array(NICE_F16[pick[b, k]], "<f2").tobytes(), np.uint8)
        data = data.reshape(-1)
        n = nb * L["E"]
        new = np.where(ints(label + "/pick", n, 0, 3) == 0,
                       np.where(ints(label + "/side", n, 0, 1) == 0, L["cmin"], L["cmax"]),
                       ints(label + "/set", n, L["cmin"], L["cmax"]))
        out.append({
            "type": t, "ggml_type": L["id"], "block_elems": L["E"], "block_bytes": L["B"],
            "cmin": L["cmin"], "cmax": L["cmax"], "n_elements": n,
            "bytes": data.tobytes().hex(),
            "codes": [int(x) for x in R.code_get(t, data)],
            "levels": [float(x) for x in R.levels(t, data)],
            "set_codes": [int(x) for x in new],
            "bytes_after_set": R.code_set(t, data, new).tobytes().hex(),
        })
    return out


PERTURB_SEEDS = [7, -11, 12345, -2024, 99, -31337, 5, -424242, 2147483647, -3]


def perturb_case(t, name, n, seed, sigma, data, stream_label=None):
    p32 = R.sigma_threshold(sigma)
    after, mask, applied = R.perturb_bytes(t, data, name, seed, p32)
    draws = len(R.noise(name, n, seed, p32)[0])
    assert 0 < applied < draws, (t, applied, draws)  # some applied, some gated
    assert np.array_equal(R.restore_bytes(t, after, name, seed, p32, mask), data)
    case = {"type": t, "tensor": name, "n_elements": n, "seed": seed, "sigma": sigma, "p32": p32}
    if stream_label is None:
        case["bytes"] = data.tobytes().hex()
    else:
        case["stream"] = stream_label
        case["bytes_sha256"] = sha(data)
    case.update({"draws": draws, "applied": applied, "mask_bytes": int(mask.size), "mask": mask.tobytes().hex(),
                 "bytes_after_sha256": sha(after)})
    return case


def build_perturb():
    out = []
    for k, t in enumerate(R.TYPE_NAMES):
        L = R.layout(t)
        n = 256
        label = f"perturb/{t}"
        data = with_ends(label, t, stream(label, blocks_for(t, n) * L["B"]), 50)
        out.append(perturb_case(t, f"blk.{k}.ffn_up.weight", n, PERTURB_SEEDS[k], 0.1, data))
    # several chunks, the last one partial: mask runs of chunks 1.. start inside a byte
    for t, n, seed, sigma in [("Q4_1", 2 * 16384 + 96, -123456789, 0.01), ("Q6_K", 16384 + 256, 77, 0.02)]:
        label = f"perturb/{t}/{n}"
        data = stream(label, blocks_for(t, n) * R.layout(t)["B"])
        out.append(perturb_case(t, "blk.11.attn_output.weight", n, seed, sigma, data, stream_label=label))
    return out


def make_steps(label, n_steps, sigmas, coef_max):
    steps = []
    for s in range(n_steps):
        base = [int(x) for x in ints(f"{label}/seed{s}", 3, 1, 2**31 - 1)]
        seeds = [base[0], -base[0], base[1], -base[1], -base[2]]  # two mirrored pairs and a lone member
        coefs = [int(x) for x in ints(f"{label}/coef{s}", 5, -coef_max, coef_max)]
        steps.append({"seeds": seeds, "coefs_q16": coefs, "p32": R.sigma_threshold(sigmas[s % len(sigmas)])})
    return steps


def update_case(t, mode, n, n_steps, beta, clamp, anti_windup, coef_max=120000, label_extra=""):
    L = R.layout(t)
    label = f"update/{mode}/{t}{label_extra}"
    data = with_ends(label, t, stream(label, blocks_for(t, n) * L["B"]), 40)
    steps = make_steps(label, n_steps, [0.3] if mode == "stored" else [0.1, 0.05, 0.2], coef_max)
    residual = None
    if mode == "stored":
        residual = ints(label + "/residual", n, -clamp, clamp).astype(np.int32)
    bq = R.beta_to_q14(beta)
    ref_steps = [(s["seeds"], s["coefs_q16"], s["p32"]) for s in steps]
    after, r, changed, dropped = R.update_bytes(t, data, f"blk.3.{mode}.weight", ref_steps, residual, bq, clamp,
                                                anti_windup)
    assert changed > 0 and dropped > 0, (label, changed, dropped)
    case = {"mode": mode, "type": t, "tensor": f"blk.3.{mode}.weight", "n_elements": n,
            "bytes": data.tobytes().hex(), "steps": steps, "beta": beta, "beta_q14": bq, "clamp_q16": clamp,
            "anti_windup": anti_windup,
            "residual": None if residual is None else [int(x) for x in residual],
            "bytes_after_sha256": sha(after), "changed": changed, "dropped": dropped}
    if mode == "stored":
        assert np.any(np.abs(r) == clamp), label  # the clamp is reached
        case["residual_after_sha256"] = res_sha(r)
    return case


STORED_BETA = [0.5, 1.0, 0.75, 0.25, 0.95, 0.9, 0.5, 1.0, 0.75, 0.9]


def build_update():
    out = []
    for k, t in enumerate(R.TYPE_NAMES):
        E = R.layout(t)["E"]
        out.append(update_case(t, "replay", 256, 4, 0.9, 98304, True))
        out.append(update_case(t, "stored", 64 if E == 32 else 256, 1, STORED_BETA[k],
                               40000 if t in ("Q2_K", "Q5_1", "Q6_K") else 98304, True))
    # anti-windup off: deltas that leave the range are cut at the range end
    out.append(update_case("Q2_K", "replay", 256, 3, 0.9, 98304, False, 200000, "/cut"))
    out.append(update_case("Q4_1", "replay", 256, 5, 0.9, 98304, False, 200000, "/cut"))
    out.append(update_case("Q8_0", "stored", 64, 1, 0.9, 98304, False, 200000, "/cut"))
    out.append(update_case("Q5_K", "stored", 256, 1, 0.5, 98304, False, 200000, "/cut"))
    # no error feedback (and window 0): the current step alone, zero residual, beta 0
    out.append(update_case("Q4_1", "replay", 256, 1, 0.0, 98304, True, 120000, "/no-ef"))
    return out


def build_digest():
    tensors = [("blk.0.attn_q.weight", "Q4_0", 64), ("blk.0.ffn_down.weight", "Q6_K", 256), ("é.weight", "Q8_0", 32)]
    rows = []
    for name, t, n in tensors:
        data = stream(f"digest/{name}", blocks_for(t, n) * R.layout(t)["B"])
        rows.append({"tensor": name, "type": t, "n_elements": n, "bytes": data.tobytes().hex()})
    digest = R.weights_digest([(r["tensor"], bytes.fromhex(r["bytes"])) for r in rows])
    return {"tensors": rows, "sha256": digest}


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
    out["notes"] = ("Spec: docs/noise-spec.md, section 9. Hex strings are raw bytes; 'stream' labels stand for "
                    "sha256(label || le32(0)) || sha256(label || le32(1)) || ... cut to the tensor's size; "
                    "residuals are hashed as little-endian int32.")
    out["fixed_point"] = build_fixed_point()
    out["codecs"] = build_codecs()
    out["perturb"] = build_perturb()
    out["update"] = build_update()
    out["digest"] = build_digest()
    return out


def render(golden) -> str:
    """The file's exact text: one draw per line, flat lists of numbers on one line."""
    text = json.dumps(golden, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+(-?\d+),\s+(-?\d+)\s+\]", r"[\1, \2]", text)  # one draw per line
    text = re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text)
    return text + "\n"


GOLDEN_PATH = Path(__file__).resolve().parent.parent / "docs" / "noise-golden.json"


if __name__ == "__main__":
    GOLDEN_PATH.write_text(render(build()))
    print(GOLDEN_PATH)
