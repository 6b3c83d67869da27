"""Inputs from an outside attack that need the real model loaded: a `demo --prompt` longer than
its context, a data line whose prompt cannot fit (refused from its byte length, before it is
tokenized), and a ledger whose derived tables were dropped (rebuilt as it is opened, before any
forward pass; the run then goes on and records what an undamaged ledger records)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import recorded_steps

pytestmark = pytest.mark.slow

TRAIN = ["--task", "choice", "--population", "2", "--batch", "2", "--n-ctx", "128", "--threads", "2"]


def qes(args, cwd, home, timeout=600):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200", "QES_EDGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "qes_edge", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=timeout)


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stdout + r.stderr
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    return errors[0]


def test_demo_prompt_longer_than_its_context(tmp_path):
    line = one_error_line(qes(["demo", "--prompt", "many words " * 400], tmp_path, tmp_path / "home"))
    assert "--prompt is" in line and "the demo's context holds 256 with 12 to generate" in line, line


def test_a_prompt_too_long_in_bytes_is_refused_before_it_is_tokenized(tmp_path):
    """50 kB of prompt: shorter than the data-line bound, longer than the 256 tokens of the
    context (128 asked, as llama.cpp pads it) of this vocabulary can spell; refused by the
    driver from its byte length."""
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join([json.dumps({"prompt": "x" * 50_000})] +
                              [json.dumps({"prompt": f"question {i}"}) for i in range(4)]) + "\n")
    r = qes(["train", "--task", "jsonl", "--data", data, "--n-ctx", "128", "--steps", "1", "--ledger",
             tmp_path / "l.qes"], tmp_path, tmp_path / "home")
    line = one_error_line(r)
    assert "long.jsonl:1: the prompt is 50,1" in line and "bytes, more than 256 tokens of this model can hold" in line, line
    assert not (tmp_path / "l.qes").exists()


def test_dropped_derived_tables_are_rebuilt_before_any_work(tiny_choice_data, tmp_path):
    data = tiny_choice_data / "bigger.jsonl"
    ref, damaged = tmp_path / "ref.qes", tmp_path / "damaged.qes"
    for ledger, steps in ((ref, 3), (damaged, 2)):
        r = qes(["train", *TRAIN, "--data", data, "--steps", steps, "--ledger", ledger], tmp_path, tmp_path / "home")
        assert r.returncode == 0, r.stderr
    members_before = sqlite3.connect(damaged).execute("select * from members order by step, member").fetchall()
    with sqlite3.connect(damaged) as c:
        c.execute("drop view step_summary")
        c.execute("drop table members")
        c.execute("drop table heads")
    r = qes(["train", *TRAIN, "--data", data, "--steps", 3, "--ledger", damaged], tmp_path, tmp_path / "home")
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr
    assert "the heads, members table(s) were missing: rebuilt from the recorded steps" in said, said
    # rebuilt before the model was loaded: said before the resume line
    assert said.index("were missing") < said.index("resuming run"), said
    assert [s[:5] for s in recorded_steps(damaged)] == [s[:5] for s in recorded_steps(ref)]
    c = sqlite3.connect(damaged)
    assert c.execute("select * from members where step < 2 order by step, member").fetchall() == members_before
    assert c.execute("select count(*) from members").fetchone()[0] == 3 * 2
    assert c.execute("select n_steps from heads").fetchone()[0] == 3
    assert c.execute("select count(*) from step_summary").fetchone()[0] == 3
    # no evaluation row for a step the ledger does not hold
    assert {s for (s,) in c.execute("select step from evals")} <= {0, 1, 2, 3}
