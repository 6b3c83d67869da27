"""Honest runs: a run's identity is its recorded config.  Options that differ are refused (with
the differences and the way out), --resume and --new-run say which is meant, a changed data
file is refused, ledgers live in the user's home folder, and `runs` lists them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qes_edge.gguf.model import file_sha256
from qes_edge.ledger.store import Ledger, StepRecord
from qes_edge.training.config import TrainConfig


def cli(args, cwd, **env):
    e = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], cwd=cwd, capture_output=True, text=True,
                          env=e, timeout=600)


def recorded_run(path, model, n_steps=2, **cfg):
    lg = Ledger(path)
    c = TrainConfig(**cfg)
    rec = c.record()
    if c.data:
        rec["data_sha256"] = file_sha256(c.data)
    run = lg.create_run(file_sha256(model), model.name, rec, 1)
    for i in range(n_steps):
        lg.append_step(run.run_id, StepRecord(i, 34268880, np.array([5, -5]), np.array([3, -3], np.int32),
                                              np.array([0.5, 0.4]), f"{i:064x}"))
    lg.close()
    return run


def test_options_that_differ_are_refused_with_the_differences(tmp_path, default_model):
    run = recorded_run(tmp_path / "r.qes", default_model, population=4, alpha=0.002)
    r = cli(["train", "--ledger", "r.qes", "--population", "8", "--alpha", "0.002", "--steps", "5"], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and f"holds run {run.run_id[:8]} (2 steps)" in line
    assert "population 8 (the run has 4)" in line and "alpha" not in line.split("other options:")[1].split(".")[0]
    assert "--resume" in line and "--new-run" in line
    # defaults that differ from the recorded config are not the user's request: no refusal for them
    # (the run resumes, and then stops at its made-up weights hashes, which this test does not fake)
    r = cli(["train", "--ledger", "r.qes", "--steps", "2"], tmp_path)
    assert "resuming run" in r.stdout and "other options" not in r.stderr, r.stdout + r.stderr


def test_resume_and_new_run_exclude_each_other(tmp_path):
    r = cli(["train", "--resume", "--new-run"], tmp_path)
    assert r.returncode == 2 and "give one of them" in r.stderr


def test_a_changed_data_file_is_refused(tmp_path, default_model):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) for i in range(6)) + "\n")
    recorded_run(tmp_path / "d.qes", default_model, task="jsonl", data=str(data))
    data.write_text(data.read_text() + json.dumps({"prompt": "new", "answer": "b"}) + "\n")
    r = cli(["train", "--ledger", "d.qes", "--task", "jsonl", "--data", str(data), "--steps", "3"], tmp_path)
    assert r.returncode == 2 and "changed since the run was recorded" in r.stderr, r.stdout + r.stderr
    data.unlink()
    r = cli(["train", "--ledger", "d.qes", "--steps", "3"], tmp_path)
    assert r.returncode == 2 and "data file" in r.stderr and "is missing" in r.stderr, r.stdout + r.stderr


def test_runs_lists_the_home_folder(tmp_path, default_model, qes_edge_home):
    (qes_edge_home / "runs").mkdir()
    run = recorded_run(qes_edge_home / "runs" / "a.qes", default_model, n_steps=3)
    (qes_edge_home / "runs" / "broken.qes").write_bytes(b"junk" * 100)
    r = cli(["runs", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    good = [x for x in rows if x.get("run_id") == run.run_id]
    assert len(good) == 1 and good[0]["steps"] == 3 and good[0]["task"] == "sentiment" and len(good[0]["head"]) == 64
    assert any(x["ledger"].endswith("broken.qes") and "not a usable ledger" in x["error"] for x in rows)
    assert (qes_edge_home / "runs" / "broken.qes").read_bytes() == b"junk" * 100


@pytest.mark.slow
def test_default_ledger_in_home_resume_and_new_run(tmp_path, qes_edge_home):
    data = tmp_path / "q.jsonl"  # a tiny task: the held-out evaluations cost one question, not 200 words
    data.write_text("\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2})
                              for i in range(6)) + "\n")
    base = ["train", "--task", "choice", "--data", str(data), "--population", "2", "--batch", "2", "--n-ctx", "128"]
    r = cli([*base, "--steps", "1"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ledgers = list((qes_edge_home / "runs").glob("*.qes"))
    assert len(ledgers) == 1 and not (tmp_path / "runs").exists()  # not the current folder
    # the same command from another folder finds the same run
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = cli([*base, "--steps", "2"], other)
    assert r.returncode == 0 and "resuming run" in r.stdout, r.stdout + r.stderr
    # a different option is refused, --resume continues with the recorded config
    r = cli([*base, "--steps", "3", "--sigma", "0.02"], other)
    assert r.returncode == 2 and "sigma 0.02 (the run has 0.01)" in r.stderr
    r = cli([*base, "--steps", "3", "--sigma", "0.02", "--resume"], other)
    assert r.returncode == 0 and "were ignored: sigma 0.02" in " ".join(r.stdout.split()), r.stdout + r.stderr
    # --new-run starts a second run in the same ledger; the first is untouched
    r = cli([*base, "--steps", "1", "--sigma", "0.02", "--new-run"], other)
    assert r.returncode == 0, r.stdout + r.stderr
    lg = Ledger(ledgers[0], readonly=True)
    runs = lg.runs()
    assert [lg.verify(x.run_id) for x in runs] == [3, 1] and runs[1].config["sigma"] == 0.02
    lg.close()


@pytest.mark.slow
def test_train_json_is_one_line_per_step_and_evaluation(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2})
                              for i in range(6)) + "\n")
    r = cli(["train", "--task", "choice", "--data", str(data), "--steps", "2", "--population", "2", "--batch", "2",
             "--n-ctx", "128", "--json", "--ledger", "j.qes"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]  # stdout is JSON only
    assert [e["event"] for e in events] == ["eval", "step", "step", "eval", "done"]
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 1]
    assert len(events[1]["rewards"]) == 2 and len(events[1]["weights_sha256"]) == 64
    assert events[-1]["head"] == events[2]["hash"] and events[-1]["steps"] == 2
