"""A run remembers where its base model was (issue 26): replay, export and follow find a base
other than the default model from where train was given it, checked against the recorded
sha256, without --base; --base stays for a moved file, and a missing one says where it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def qes(*args, home):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QES_EDGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], capture_output=True, text=True, env=env)


def test_replay_export_and_follow_find_the_base_where_train_was_given_it(tmp_path):
    from models.synthetic import write_synthetic
    from qes_edge.ledger.store import Ledger
    from qes_edge.training.follow import Follower
    (tmp_path / "models").mkdir()
    model = write_synthetic(tmp_path / "models" / "tiny.gguf", n_layer=2, n_embd=128, n_ff=256)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Is {a} bigger than {b}? Answer:", "choices": [" yes", " no"],
                                        "answer": int(a <= b)}) + "\n" for a, b in [(7, 3), (2, 9), (8, 1), (4, 6), (5, 0)]))
    ledger = tmp_path / "run.qes"
    r = qes("train", "--model", str(model), "--task", "choice", "--data", str(data), "--raw-prompt", "--steps", "2",
            "--population", "2", "--batch", "2", "--threads", "1", "--sigma", "0.05", "--alpha", "0.05",
            "--ledger", str(ledger), home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    lg = Ledger(ledger, readonly=True)
    cfg = lg.runs()[-1].config
    lg.close()
    assert cfg["base_path"] == str(model.resolve()) and cfg["base_given"] == str(model)

    r = qes("replay", "--ledger", str(ledger), "--out", str(tmp_path / "r.gguf"), home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    r = qes("export", "--ledger", str(ledger), "--out", str(tmp_path / "e.gguf"), home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    f = Follower(ledger, tmp_path / "f.gguf")
    assert f.advance().n_steps == 2
    assert (tmp_path / "f.gguf").read_bytes() == (tmp_path / "r.gguf").read_bytes()

    moved = tmp_path / "elsewhere.gguf"
    shutil.move(model, moved)
    r = qes("replay", "--ledger", str(ledger), "--out", str(tmp_path / "r2.gguf"), home=tmp_path / "home")
    assert r.returncode == 2
    assert f"was at {model.resolve()}" in r.stderr and "pass where it is with --base" in r.stderr, r.stderr
    r = qes("replay", "--ledger", str(ledger), "--out", str(tmp_path / "r2.gguf"), "--base", str(moved),
            home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r2.gguf").read_bytes() == (tmp_path / "r.gguf").read_bytes()
    # another file at the recorded path is refused by its sha256, not trusted by its name
    write_synthetic(model, n_layer=2, n_embd=128, n_ff=256, seed=1)
    r = qes("replay", "--ledger", str(ledger), "--out", str(tmp_path / "r3.gguf"), home=tmp_path / "home")
    assert r.returncode == 2 and "is not this run's base model" in r.stderr, r.stderr
