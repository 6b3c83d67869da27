"""The NEON backend (aarch64), cross-built and run under qemu: scripts/test_aarch64.sh.

The slow test runs the script (it installs the cross compiler and qemu-user with apt-get when
they are missing, then test_native, golden_check and bench_backends under qemu-aarch64); the
fast one checks that tests/golden_text.py, which turns docs/noise-golden.json into the text that
native/tests/golden_check.c reads, writes every case of the JSON."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import golden_text as G

ROOT = Path(__file__).resolve().parent.parent


def test_golden_text_holds_every_case(tmp_path):
    out = tmp_path / "golden.txt"
    subprocess.run([sys.executable, str(ROOT / "tests" / "golden_text.py"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    golden = json.loads(G.DEFAULT_JSON.read_text(encoding="utf-8"))
    want = G.case_counts(golden)
    lines = out.read_text(encoding="ascii").splitlines()
    assert lines[0] == f"# cases {sum(want.values())}"
    cases = [ln for ln in lines if ln and not ln.startswith("#")]
    got = {k: sum(1 for ln in cases if ln.split(" ", 1)[0] == k) for k in G.KINDS}
    assert got == want and len(cases) == sum(want.values())
    assert all(v > 0 for v in want.values())
    # round trip of the fields C reads: every perturb case's mask and applied count, every update
    # case's steps, in JSON order
    perturb = [ln.split(" ") for ln in cases if ln.startswith("perturb ")]
    for row, case in zip(perturb, golden["perturb"]):
        assert len(row) == 12
        assert row[9] == case["mask"] and int(row[10]) == case["applied"]
        if "bytes" in case:
            assert row[6] == case["bytes"]
        else:  # a "stream" input, expanded by golden_text.py
            assert hashlib.sha256(bytes.fromhex(row[6])).hexdigest() == case["bytes_sha256"]
    update = [ln.split(" ") for ln in cases if ln.startswith("update ")]
    for row, case in zip(update, golden["update"]):
        n_steps = int(row[9])
        assert n_steps == len(case["steps"]) and len(row) == 10 + 3 * n_steps + 4
        for s, step in enumerate(case["steps"]):
            p32, seeds, coefs = row[10 + 3 * s:13 + 3 * s]
            assert (int(p32), [int(x) for x in seeds.split(",")], [int(x) for x in coefs.split(",")]) == \
                (step["p32"], step["seeds"], step["coefs_q16"])
        assert row[-4:] == [case["bytes_after_sha256"], str(case["changed"]), str(case["dropped"]),
                            case.get("residual_after_sha256") or "-"]


@pytest.mark.slow
def test_aarch64_under_qemu():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "test_aarch64.sh")], cwd=ROOT, capture_output=True,
                       text=True, timeout=20 * 60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "test_native: backends compared with portable: portable neon" in out, out[-6000:]
    assert any(ln.startswith("backend neon: ") and ln.endswith("cases, all match") for ln in out.splitlines()), out[-6000:]
    # the tests' stand-in device (QES_EDGE_STANDIN_DEVICE=1, conftest) joins the comparison where it is set
    assert any(ln.rstrip().endswith(("cases passed on portable, neon", "cases passed on portable, neon, standin"))
               for ln in out.splitlines()), out[-6000:]
    assert any(ln.startswith("{\"backend\": \"neon\"") and "\"emulated\": true" in ln
               for ln in out.splitlines()), out[-6000:]
