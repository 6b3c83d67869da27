"""Several rewards in TRL's form through a real run (issue 26): `--reward a:f --reward b:g=0.5`
is their weighted sum; each one's batch mean per member is in the step's record (train --json),
the ledger's member rows and `log`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REWARDS = '''
def short(completions, prompts, examples):      # TRL's form (first parameter: completions)
    return [1.0 / (1 + len(c)) for c in completions]

def has_digit(prompt, completion, example):     # one completion at a time
    return float(any(ch.isdigit() for ch in completion))
'''


def test_two_rewards_are_summed_with_weights_and_each_is_recorded(tmp_path):
    from models.synthetic import write_synthetic
    from qes_edge.ledger.store import Ledger
    model = write_synthetic(tmp_path / "syn.gguf", n_layer=2, n_embd=128, n_ff=256)
    (tmp_path / "myrewards.py").write_text(REWARDS)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(8)))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QES_EDGE_HOME": str(tmp_path / "home")}
    ledger = tmp_path / "r.qes"
    r = subprocess.run([sys.executable, "-m", "qes_edge", "train", "--model", str(model), "--raw-prompt",
                        "--data", str(data), "--reward", "myrewards:short", "--reward", "myrewards:has_digit=0.5",
                        "--steps", "2", "--population", "4", "--batch", "2", "--threads", "1", "--ledger", str(ledger),
                        "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(x) for x in r.stdout.splitlines() if '"event": "step"' in x]
    evals = [json.loads(x) for x in r.stdout.splitlines() if '"event": "eval"' in x]
    assert evals and "reward myrewards:short" in evals[0] and "reward myrewards:has_digit" in evals[0]
    for s in steps:
        parts = s["timings"]["reward_parts"]
        assert set(parts) == {"myrewards:short", "myrewards:has_digit"}
        for k, total in enumerate(s["rewards"]):  # the member's reward is the weighted sum of its parts
            assert total == pytest.approx(parts["myrewards:short"][k] + 0.5 * parts["myrewards:has_digit"][k], abs=1e-5)
    lg = Ledger(ledger, readonly=True)
    run = lg.runs()[-1]
    assert run.config["task"] == "reward" and run.config["rewards"] == [["myrewards:short", 1.0],
                                                                          ["myrewards:has_digit", 0.5]]
    members = lg.members(run.run_id, 0)
    lg.close()
    assert len(members) == 4 and all(set(m["rewards"]) == {"myrewards:short", "myrewards:has_digit"} for m in members)
    log = subprocess.run([sys.executable, "-m", "qes_edge", "log", str(ledger)], capture_output=True, text=True, env=env)
    assert log.returncode == 0 and "myrewards:short 0." in log.stdout and "myrewards:has_digit " in log.stdout, log.stdout
    rep = subprocess.run([sys.executable, "-m", "qes_edge", "report", str(ledger), "--out", str(tmp_path / "r.html")],
                         capture_output=True, text=True, env=env)
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "r.html").read_text()
    assert "<th class=n>myrewards:short</th>" in html and "<th class=n>myrewards:has_digit</th>" in html
