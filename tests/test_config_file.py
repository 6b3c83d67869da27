"""--config F.toml|F.yaml for train and queue add (issue 26): every option by its long name, the
command line overriding the file, values checked as the same options on the command line, the
resolved options printed by --print-config as a file --config reads back, and a config file's
options counted as given by the user when a run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def qes(*args, home, cwd=None):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QES_EDGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], capture_output=True, text=True, env=env, cwd=cwd)


def printed(text: str) -> dict:
    import tomllib
    return tomllib.loads(text)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    (d / "d.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "choices": [" a", " b"], "answer": i % 2}) + "\n"
                                       for i in range(6)))
    return d


def test_the_file_sets_options_and_the_command_line_overrides_it(folder, tmp_path):
    cfg = folder / "run.toml"
    cfg.write_text('task = "choice"\ndata = "d.jsonl"\npopulation = 32\neval-batch = 4\nraw_prompt = true\n'
                   'error-feedback = false\ngpu-layers = "0"\n')
    r = qes("train", "-c", str(cfg), "--population", "8", "--print-config", home=tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = printed(r.stdout)
    assert got["population"] == 8 and got["eval-batch"] == 4 and got["raw-prompt"] is True
    assert got["error-feedback"] is False and got["task"] == "choice"
    assert got["data"] == str(folder / "d.jsonl")  # relative to the config file's folder, not the cwd
    assert "split = fixed" in r.stdout
    again = tmp_path / "again.toml"
    again.write_text(r.stdout)
    r2 = qes("train", "-c", str(again), "--print-config", home=tmp_path)
    assert r2.returncode == 0 and r2.stdout == r.stdout  # what it prints is a config it reads back


def test_a_repeated_option_is_a_list(folder, tmp_path):
    cfg = folder / "r.toml"
    cfg.write_text('data = "d.jsonl"\nreward = ["m:f", "m:g=0.5"]\n')
    r = qes("train", "-c", str(cfg), "--print-config", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert printed(r.stdout)["reward"] == ["m:f", "m:g=0.5"]
    cfg.write_text('data = "d.jsonl"\nreward = "m:f"\n')
    assert printed(qes("train", "-c", str(cfg), "--print-config", home=tmp_path).stdout)["reward"] == ["m:f"]


def test_yaml_reads_the_same(folder, tmp_path):
    (folder / "run.yaml").write_text("task: choice\ndata: d.jsonl\npopulation: 12\nsigma: 0.02\n")
    r = qes("train", "--config", str(folder / "run.yaml"), "--print-config", home=tmp_path)
    assert r.returncode == 0, r.stderr
    got = printed(r.stdout)
    assert (got["population"], got["sigma"], got["task"]) == (12, 0.02, "choice")


@pytest.mark.parametrize("text, says", [
    ("populaton = 4\n", "'populaton' is not an option of this command (options: alpha,"),
    ("population = 'many'\n", "Invalid value for '--population': 'many' is not a valid int"),
    ("population = [4\n", "not TOML"),
    ("population = 3\n", "population must be an even number"),
    ("sigma = { a = 1 }\n", "sigma must be a single value"),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, text, says):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = qes("train", "-c", str(cfg), "--print-config", home=tmp_path)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = qes("train", "-c", str(tmp_path / "missing.toml"), home=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_queue_add_takes_the_file_and_records_its_options(folder, tmp_path):
    cfg = folder / "run.toml"
    cfg.write_text('task = "choice"\ndata = "d.jsonl"\npopulation = 6\nsteps = 7\nledger = "run.qes"\n')
    r = qes("queue", "add", "-c", str(cfg), "--batch", "3", home=tmp_path)
    assert r.returncode == 0, r.stderr
    from qes_edge.agent.db import DaemonDB
    db = DaemonDB(tmp_path / "daemon.db")
    try:
        (job,) = db.jobs(("queued",))
    finally:
        db.close()
    assert job.steps == 7 and Path(job.ledger) == folder / "run.qes"
    o = job.options
    assert o["cfg"]["population"] == 6 and o["cfg"]["batch"] == 3 and o["cfg"]["data"] == str(folder / "d.jsonl")
    assert {"population", "batch", "data", "task"} <= set(o["explicit"])  # the file's options are the user's
