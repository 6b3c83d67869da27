"""Training end to end on the real model: the driver's self-check, train -> ledger -> replay
bit for bit, resume, reward failures, refusal of a foreign base model."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qes_edge.cli.main import app

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def driver(default_model):
    from qes_edge.llama.driver import ModelDriver
    return ModelDriver(default_model, n_ctx=256)


def test_self_check_fails_when_edits_do_not_reach_the_forward_pass(driver, default_model):
    from qes_edge.llama.driver import SelfCheckFailed
    from qes_edge.gguf.model import GGUFModel
    live = driver.tensors
    try:
        driver.tensors = GGUFModel(default_model).code_tensors()  # a copy llama.cpp never reads
        with pytest.raises(SelfCheckFailed, match="did not change the logits"):
            driver.self_check()
    finally:
        driver.tensors = live
    driver.self_check()


def train(tmp_path, *extra, steps=2):
    ledger = tmp_path / "run.qes"
    res = runner.invoke(app, ["train", "--steps", str(steps), "--population", "4", "--batch", "3",
                              "--ledger", str(ledger), "--n-ctx", "256", *extra])
    return ledger, res


def test_train_replay_resume(tmp_path, driver):
    from qes_edge.ledger.store import Ledger
    ledger, res = train(tmp_path)
    assert res.exit_code == 0, res.output
    lg = Ledger(ledger)
    run = lg.run()
    assert lg.verify(run.run_id) == 2
    recs = list(lg.steps(run.run_id))
    assert all(len(r.seeds) == 4 and np.array_equal(r.seeds[1::2], -r.seeds[0::2]) for r in recs)
    assert recs[0].timings["eval_s"] > 0 and run.config["population"] == 4
    assert [e["step"] for e in lg.evals(run.run_id) if e["split"] == "heldout"] == [0, 2]
    memory = [e for e in lg.evals(run.run_id) if e["split"] == "memory"]
    assert [e["step"] for e in memory] == [0] and 50 < memory[0]["inference_rss_mb"] <= memory[0]["peak_rss_mb"]
    assert all(r.timings["rss_mb"] >= memory[0]["inference_rss_mb"] for r in recs)
    lg.close()
    # resume to 3 steps: the first two are replayed, not redone
    _, res = train(tmp_path, steps=3)
    assert res.exit_code == 0, res.output and "resuming run" in res.output
    lg = Ledger(ledger)
    assert lg.verify(lg.run().run_id) == 3
    last = lg.last_step(lg.run().run_id)
    recorded = [e for e in lg.evals(lg.run().run_id) if e["step"] == 3 and e["split"] == "heldout"]
    lg.close()
    # replay from the base model and the ledger alone gives the recorded weights
    out = tmp_path / "trained.gguf"
    res = runner.invoke(app, ["replay", "--ledger", str(ledger), "--out", str(out)])
    assert res.exit_code == 0, res.output
    from qes_edge.gguf.model import GGUFModel
    m = GGUFModel(out)
    assert m.weights_digest(m.code_tensors()) == last.weights_sha256
    # and `eval` of the written file scores exactly what training measured on the live weights
    res = runner.invoke(app, ["eval", "--model", str(out), "--n-ctx", "256", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert len(recorded) == 1 and got == {k: v for k, v in recorded[0].items() if k not in ("step", "split")}
    # a tampered ledger is refused by replay with a non-zero exit
    import sqlite3
    with sqlite3.connect(ledger) as c:
        c.execute("update steps set coefs_q16 = ? where step = 1", [np.zeros(4, "<i4").tobytes()])
    res = runner.invoke(app, ["replay", "--ledger", str(ledger), "--out", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "step 1 was edited" in " ".join(res.output.split())


def test_foreign_base_model_is_refused(tmp_path, model_of_type):
    ledger, res = train(tmp_path, steps=1)
    assert res.exit_code == 0, res.output
    other = model_of_type("Q8_0")
    res = runner.invoke(app, ["train", "--model", str(other), "--steps", "2", "--ledger", str(ledger)])
    assert res.exit_code == 2 and "refusing to mix" in " ".join(res.output.split())
    res = runner.invoke(app, ["replay", "--ledger", str(ledger), "--base", str(other), "--out", str(tmp_path / "o.gguf")])
    assert res.exit_code == 2 and "not this run's base model" in " ".join(res.output.split())


def flaky_reward(prompt, completion, example):
    """Fails for every prompt, so every member fails."""
    raise RuntimeError("reward server down")


def test_reward_failures_stop_with_a_clear_message(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say p{i}"}) for i in range(5)) + "\n")
    ledger = tmp_path / "f.qes"
    res = runner.invoke(app, ["train", "--task", "test_train:flaky_reward", "--data", str(data), "--steps", "2",
                              "--population", "2", "--batch", "4", "--ledger", str(ledger), "--n-ctx", "256"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "members failed their reward" in text and "reward server down" in text


def test_a_branch_replays_to_its_parent_and_trains_on(tmp_path, driver):
    """`branch` continues a run as a new one: replaying it gives the parent's weights at the branch
    point, and training it on redoes the parent's next step bit for bit (same seeds, same batch,
    same weights: the run is a pure function of its config and base)."""
    from qes_edge.gguf.model import GGUFModel
    from qes_edge.ledger.store import Ledger
    ledger, res = train(tmp_path)
    assert res.exit_code == 0, res.output
    lg = Ledger(ledger, readonly=True)
    parent = lg.run()
    p_steps = list(lg.steps(parent.run_id))
    lg.close()
    res = runner.invoke(app, ["branch", "--ledger", str(ledger), "--steps", "1", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["parent"] == {"run_id": parent.run_id, "steps": 1, "head": p_steps[0].hash} and info["steps"] == 1
    out = tmp_path / "branch.gguf"
    res = runner.invoke(app, ["replay", "--ledger", str(ledger), "--run-id", info["run_id"], "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = GGUFModel(out)
    assert m.weights_digest(m.code_tensors()) == p_steps[0].weights_sha256
    # train continues the branch (the ledger's latest run), not the parent
    _, res = train(tmp_path)
    assert res.exit_code == 0, res.output
    assert f"resuming run {info['run_id'][:8]}" in res.output
    lg = Ledger(ledger, readonly=True)
    assert lg.verify(parent.run_id) == 2 and lg.verify(info["run_id"]) == 2
    child = list(lg.steps(info["run_id"]))
    lg.close()
    assert child[1].hash != p_steps[1].hash  # another chain ...
    for a, b in zip(child, p_steps):         # ... with the same training in it
        assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.coefs_q16, b.coefs_q16)
        assert np.array_equal(a.rewards, b.rewards) and a.weights_sha256 == b.weights_sha256
