"""--data DIR as mlx-lm lays data out (issue 26): train.jsonl, valid.jsonl held out as it is and
never trained on, test.jsonl scored once at the end and by `eval --split test`; --data F keeps
its fixed 20% and says so; the split is recorded and a resumed run keeps it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qes_edge.tasks.data import data_files
from qes_edge.tasks.jsonl import ChoiceTask, JsonlTask
from qes_edge.training.config import TrainConfig
from qes_edge.training.opening import data_sha256


def rows(n, tag):
    return [{"prompt": f"{tag} question {i}: is {i} even? Answer:", "choices": [" yes", " no"], "answer": i % 2}
            for i in range(n)]


def write(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "train.jsonl", rows(30, "train"))
    write(d / "valid.jsonl", rows(7, "valid"))
    write(d / "test.jsonl", rows(5, "test"))
    return d


def test_a_folder_trains_on_train_and_holds_out_valid_as_it_is(folder):
    t = ChoiceTask(folder, split="valid")
    assert [e.prompt for e in t.train_examples()] == [r["prompt"] for r in rows(30, "train")]
    assert [e.prompt for e in t.heldout_examples()] == [r["prompt"] for r in rows(7, "valid")]
    assert [e.prompt for e in t.test_examples()] == [r["prompt"] for r in rows(5, "test")]
    assert not {e.prompt for e in t.train_examples()} & {e.prompt for e in t.heldout_examples()}
    assert len(t.examples_of("all")) == 42 and t.examples_of("valid") == t.heldout_examples()
    assert "held-out: valid.jsonl as it is (7 examples, never trained on)" in t.describe_data()
    assert "test.jsonl (5) scored once at the end" in t.describe_data()


def test_a_file_keeps_its_fixed_split_and_says_so(tmp_path):
    f = write(tmp_path / "one.jsonl", rows(200, "q"))
    t = JsonlTask(f)
    assert len(t.heldout_examples()) == 40 and len(t.train_examples()) == 160
    assert len(t.examples_of("all")) == 200  # `eval --split all` scores every line of the file
    assert "a fixed 20% of one.jsonl (40 of 200 lines; give --data DIR" in t.describe_data()
    with pytest.raises(ValueError, match="--split valid: .* has no valid.jsonl"):
        t.examples_of("valid")
    with pytest.raises(ValueError, match="--split test: .* has no test.jsonl"):
        t.examples_of("test")


def test_a_folder_without_valid_holds_out_a_fixed_20_percent_of_train(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write(d / "train.jsonl", rows(50, "t"))
    assert data_files(d).default_split() == "fixed"
    t = JsonlTask(d)
    assert len(t.heldout_examples()) == 10 and "put a valid.jsonl beside it" in t.describe_data()


def test_bad_folders_are_named(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write(d / "valid.jsonl", rows(5, "v"))
    with pytest.raises(ValueError, match="needs train.jsonl .* it holds valid.jsonl"):
        data_files(d)
    with pytest.raises(ValueError, match="data file not found"):
        data_files(tmp_path / "nope")
    write(d / "train.jsonl", rows(5, "t"))
    (d / "valid.jsonl").unlink()
    with pytest.raises(ValueError, match="holds out valid.jsonl, which is not there"):
        JsonlTask(d, split="valid")


def test_the_split_is_recorded_and_old_runs_read_as_fixed(folder, tmp_path):
    assert TrainConfig.from_options({"task": "choice", "data": folder}).split == "valid"
    assert TrainConfig.from_options({"task": "choice", "data": write(tmp_path / "f.jsonl", rows(9, "f"))}).split == "fixed"
    rec = TrainConfig(task="choice", data=str(folder), split="valid").record()
    assert rec["split"] == "valid" and TrainConfig.from_record(rec).split == "valid"
    old = {k: v for k, v in rec.items() if k != "split"}
    assert TrainConfig.from_record(old).split == "fixed"


def test_the_data_hash_covers_what_training_reads(folder):
    a = data_sha256(folder, "valid")
    write(folder / "test.jsonl", rows(6, "test"))  # scored at the end only: not training's data
    assert data_sha256(folder, "valid") == a
    write(folder / "valid.jsonl", rows(8, "valid"))
    assert data_sha256(folder, "valid") != a
    b = data_sha256(folder, "fixed")
    write(folder / "valid.jsonl", rows(9, "valid"))
    assert data_sha256(folder, "fixed") == b  # a fixed-split run does not read valid.jsonl


def _qes(*args, home):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QES_EDGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_train_and_eval_on_a_data_folder(folder, tmp_path):
    from models.synthetic import write_synthetic
    from qes_edge.ledger.store import Ledger
    model = write_synthetic(tmp_path / "syn.gguf", n_layer=2, n_embd=128, n_ff=256)
    common = ["--model", str(model), "--task", "choice", "--raw-prompt", "--threads", "1"]
    ledger = tmp_path / "run.qes"
    r = _qes("train", *common, "--data", str(folder), "--steps", "2", "--population", "2", "--batch", "2",
             "--ledger", str(ledger), "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert "held-out: valid.jsonl as it is (7 examples, never trained on)" in r.stderr
    evals = [json.loads(x) for x in r.stdout.splitlines() if '"event": "eval"' in x]
    assert [(e["step"], e["split"]) for e in evals] == [(0, "heldout"), (2, "heldout"), (2, "test")]
    lg = Ledger(ledger, readonly=True)
    run = lg.runs()[-1]
    assert run.config["split"] == "valid"
    assert [(e["step"], e["split"]) for e in lg.evals(run.run_id) if e["split"] != "memory"] == \
        [(0, "heldout"), (2, "heldout"), (2, "test")]
    lg.close()
    # eval scores each split as it is
    for split, n in (("test", 5), ("valid", 7), ("heldout", 7), ("all", 42), ("train", 30)):
        r = _qes("eval", *common, "--data", str(folder), "--split", split, home=tmp_path / "home")
        assert r.returncode == 0, (split, r.stderr)
        assert f"{n} {'held-out' if split == 'heldout' else split} examples" in r.stdout, (split, r.stdout)
    # the training data changed: the run is refused on resume, and says so
    write(folder / "train.jsonl", rows(31, "train"))
    r = _qes("train", *common, "--data", str(folder), "--steps", "3", "--population", "2", "--batch", "2",
             "--ledger", str(ledger), home=tmp_path / "home")
    assert r.returncode == 2 and "changed since the run was recorded" in r.stderr
