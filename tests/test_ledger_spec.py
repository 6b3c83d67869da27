"""docs/ledger-spec.md is enough to check a ledger: from `qes-edge dump` alone, every hash of the
run is recomputed here as the spec says (not with qes_edge's code), and `verify`, `replay` and
`dump` print the same head."""

import hashlib
import json
import struct

import numpy as np
from typer.testing import CliRunner

from qes_edge.cli.main import app
from qes_edge.ledger.store import Ledger, StepRecord

runner = CliRunner()


def H(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack("<Q", len(p)) + p)
    return h.hexdigest()


def canon(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def test_every_hash_follows_the_spec(tmp_path):
    lg = Ledger(tmp_path / "r.qes")
    run = lg.create_run("ab" * 32, "base.gguf", {"sigma": 0.01, "note": "é"}, 1)
    rng = np.random.default_rng(3)
    for i in range(4):
        rewards = rng.random(4)
        rewards[1] = np.nan if i == 2 else rewards[1]
        lg.append_step(run.run_id, StepRecord(i, 34268880 + i, np.array([7 + i, -7 - i, 9, -9]),
                                              rng.integers(-5000, 5000, 4).astype(np.int32), rewards,
                                              f"{i + 1:064x}", {"eval_s": 1.25 * i}, failures=int(i == 2)))
    lg.close()
    out = tmp_path / "dump.jsonl"
    res = runner.invoke(app, ["dump", "--ledger", str(tmp_path / "r.qes"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    head, *steps = [json.loads(line) for line in out.read_text().splitlines()]
    assert head["format"] == "qes-edge-ledger-dump" and head["n_steps"] == 4 == len(steps)
    run_hash = H(b"\0" * 32, head["run_id"].encode(), bytes.fromhex(head["base_sha256"]), head["base_name"].encode(),
                 canon(head["config"]), struct.pack("<q", head["noise_spec"]))
    assert run_hash == head["run_hash"]
    prev = run_hash
    for s in steps:
        payload = b"".join([head["run_id"].encode(), struct.pack("<q", s["step"]), struct.pack("<I", s["threshold"]),
                            struct.pack("<q", s["failures"]), np.array(s["seeds"], "<i8").tobytes(),
                            np.array(s["coefs_q16"], "<i4").tobytes(), bytes.fromhex(s["rewards_f64le"]),
                            bytes.fromhex(s["weights_sha256"]), canon(s["timings"])])
        assert s["prev_hash"] == prev and H(bytes.fromhex(prev), payload) == s["hash"]
        prev = s["hash"]
    assert head["head"] == prev
    assert np.isnan(np.frombuffer(bytes.fromhex(steps[2]["rewards_f64le"]), "<f8")[1])
    res = runner.invoke(app, ["verify", "--ledger", str(tmp_path / "r.qes")])
    assert res.exit_code == 0 and f"head {prev}" in res.output and "4 steps" in res.output
