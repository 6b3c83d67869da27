"""docs/noise-golden.json as plain text for C (native/tests/golden_check.c).

    python tests/golden_text.py [--json docs/noise-golden.json] [--out build/noise-golden.txt]

Python's standard library only (CMake runs it at build time, cross builds included).  One case
a line, fields separated by one space; C reads them with sscanf/strtoll, nothing to unescape:

  hex strings are raw bytes ("-" when empty); tensor names are hex of their UTF-8 bytes;
  lists of integers are comma-separated, no spaces ("-" when empty); float32 values are the
  8 hex digits of their bit pattern (big-endian reading of the uint32); "stream" inputs are
  expanded to their bytes here, so C needs no generator.

  noise   NAME N SEED P32 COUNT SHA256                     (draw records: le u64 pos, i8 sign)
  codec   GGML_TYPE N BYTES CODES LEVELS SET_CODES BYTES_AFTER_SET
  perturb GGML_TYPE NAME N SEED P32 BYTES DRAWS MASK_BYTES MASK APPLIED BYTES_AFTER_SHA256
  update  GGML_TYPE NAME N BYTES BETA_Q14 CLAMP_Q16 ANTI_WINDUP RESIDUAL N_STEPS
          {P32 SEEDS COEFS_Q16} x N_STEPS  BYTES_AFTER_SHA256 CHANGED DROPPED RESIDUAL_AFTER_SHA256
          (all on one line; RESIDUAL and RESIDUAL_AFTER_SHA256 are "-" in seed-replay mode)
  digest  N_TENSORS {NAME GGML_TYPE N BYTES} x N_TENSORS SHA256

Lines starting with '#' are comments; the first one says how many cases follow."""

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "docs" / "noise-golden.json"
DEFAULT_OUT = ROOT / "build" / "noise-golden.txt"
KINDS = ("noise", "codec", "perturb", "update", "digest")


def stream(label: str, nbytes: int) -> bytes:
    """sha256(label || le32(0)) || sha256(label || le32(1)) || ... cut to nbytes (make_golden.stream)."""
    out = bytearray()
    i = 0
    while len(out) < nbytes:
        out += hashlib.sha256(label.encode() + i.to_bytes(4, "little")).digest()
        i += 1
    return bytes(out[:nbytes])


def hx(b: bytes) -> str:
    return b.hex() if b else "-"


def name_hex(name: str) -> str:
    return hx(name.encode("utf-8"))


def ints(xs) -> str:
    return ",".join(str(int(x)) for x in xs) if len(xs) else "-"


def f32_bits(xs) -> str:
    return ",".join(f"{struct.unpack('<I', struct.pack('<f', float(x)))[0]:08x}" for x in xs) if len(xs) else "-"


def case_counts(golden) -> dict:
    """The number of cases of each kind in the JSON (what the text must hold)."""
    return {"noise": len(golden["cases"]), "codec": len(golden["codecs"]), "perturb": len(golden["perturb"]),
            "update": len(golden["update"]), "digest": 1 if golden.get("digest") else 0}


def lines(golden) -> list:
    types = {c["type"]: c["ggml_type"] for c in golden["codecs"]}  # name -> ggml id, from the file itself
    block = {c["type"]: (c["block_elems"], c["block_bytes"]) for c in golden["codecs"]}

    def input_bytes(case) -> bytes:
        if "bytes" in case:
            return bytes.fromhex(case["bytes"])
        elems, nbytes = block[case["type"]]
        data = stream(case["stream"], case["n_elements"] // elems * nbytes)
        if hashlib.sha256(data).hexdigest() != case["bytes_sha256"]:
            raise ValueError(f"stream {case['stream']!r} does not give bytes_sha256")
        return data

    out = []
    for c in golden["cases"]:
        out.append(f"noise {name_hex(c['tensor'])} {c['n_elements']} {c['seed']} {c['p32']} {c['count']} {c['sha256']}")
    for c in golden["codecs"]:
        out.append(f"codec {c['ggml_type']} {c['n_elements']} {hx(bytes.fromhex(c['bytes']))} {ints(c['codes'])} "
                   f"{f32_bits(c['levels'])} {ints(c['set_codes'])} {hx(bytes.fromhex(c['bytes_after_set']))}")
    for c in golden["perturb"]:
        out.append(f"perturb {types[c['type']]} {name_hex(c['tensor'])} {c['n_elements']} {c['seed']} {c['p32']} "
                   f"{hx(input_bytes(c))} {c['draws']} {c['mask_bytes']} {hx(bytes.fromhex(c['mask']))} "
                   f"{c['applied']} {c['bytes_after_sha256']}")
    for c in golden["update"]:
        steps = " ".join(f"{s['p32']} {ints(s['seeds'])} {ints(s['coefs_q16'])}" for s in c["steps"])
        residual = "-" if c["residual"] is None else ints(c["residual"])
        out.append(f"update {types[c['type']]} {name_hex(c['tensor'])} {c['n_elements']} {hx(input_bytes(c))} "
                   f"{c['beta_q14']} {c['clamp_q16']} {1 if c['anti_windup'] else 0} {residual} {len(c['steps'])} "
                   f"{steps} {c['bytes_after_sha256']} {c['changed']} {c['dropped']} "
                   f"{c.get('residual_after_sha256') or '-'}")
    if golden.get("digest"):
        d = golden["digest"]
        rows = " ".join(f"{name_hex(r['tensor'])} {types[r['type']]} {r['n_elements']} {hx(bytes.fromhex(r['bytes']))}"
                        for r in d["tensors"])
        out.append(f"digest {len(d['tensors'])} {rows} {d['sha256']}")
    return out


def render(golden) -> str:
    body = lines(golden)
    head = [f"# cases {len(body)}",
            "# docs/noise-golden.json as text for native/tests/golden_check.c (tests/golden_text.py)"]
    return "\n".join(head + body) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    text = render(json.loads(a.json.read_text(encoding="utf-8")))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(text, encoding="ascii")
    tmp.replace(a.out)  # never a half-written file for a concurrent reader
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
