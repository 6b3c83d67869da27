"""Output that reads well where it goes (issue 26): run from a script (not a terminal) nothing is
wrapped at 80 columns, and `--help` at 80 columns keeps each option's help in sentences, not in a
column a word wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def qes(*args, **env):
    e = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **env}
    e.pop("COLUMNS", None) if "COLUMNS" not in env else None
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], capture_output=True, text=True, env=e)


@pytest.mark.parametrize("cmd", [["train"], ["eval"], ["follow"], ["worker"], ["info"], ["daemon", "start"]])
def test_help_at_80_columns_keeps_sentences_together(cmd):
    r = qes(*cmd, "--help", COLUMNS="80")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    # no box drawing, and the help of an option is not cut a word a line
    assert not any(c in r.stdout for c in "╭│╰")
    options = lines[lines.index("Options:") + 1:]
    words = [len(x.split()) for x in options if x.strip()]
    assert len(words) > 4 and sum(words) / len(words) >= 5, r.stdout  # sentences, not a word a line


@pytest.mark.slow
def test_a_script_reads_paths_and_messages_on_one_line(tmp_path):
    """train's start line and its `done` line hold the whole ledger path when stdout is a pipe."""
    from models.synthetic import write_synthetic
    model = write_synthetic(tmp_path / "syn.gguf", n_layer=2, n_embd=128, n_ff=256)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "Is {a} bigger than {b}? Answer:", "choices": [" yes", " no"], '
                            f'"answer": {int(a <= b)}}}\n' for a, b in [(7, 3), (2, 9), (8, 1), (4, 6), (5, 0)]))
    ledger = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2) / "run.qes"
    ledger.parent.mkdir()
    r = qes("train", "--model", str(model), "--task", "choice", "--data", str(data), "--raw-prompt", "--steps", "1",
            "--population", "2", "--batch", "2", "--threads", "1", "--ledger", str(ledger),
            QES_EDGE_HOME=str(tmp_path / "home"))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert any(line.endswith(f"ledger {ledger}") for line in out.splitlines()), out
    assert f"done: 1 steps in {ledger}" in out
