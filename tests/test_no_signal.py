"""Steps without signal: the cause named for each way a step can carry none, the streak that
train, the daemon, status and report show, and the trainer recording it in the step's row."""

import numpy as np
import pytest

from qes_edge.training.no_signal import KEY, STREAK, alarm, diagnose, streak
from qes_edge.training.config import TrainConfig
from test_trainer_unit import ToyTask, make

Z = np.zeros(8, np.int32)


@pytest.mark.parametrize("rewards, batch, cause", [
    ([1.0] * 8, 24, "the reward is saturated: every member scored 1 on the batch"),
    ([0.0] * 8, 24, "the reward is saturated: every member scored 0"),
    ([0.5] * 8, 24, "each reward is a mean of 24 right/wrong scores, too few to tell the perturbations apart"),
    ([0.4871] * 8, 24, "every member scored 0.4871: sigma is too small to change the reward"),
    ([0.5, 0.5, 0.75, 0.75, 0.25, 0.25, 0.5, 0.5], 4, "every mirrored pair differed by +0"),
    ([0.62, 0.6, 0.71, 0.7, 0.35, 0.3, 0.51, 0.5], 24, None),  # q16 all 0 but real differences
    ([0.6, np.nan, np.nan, 0.7, np.nan, 0.2, 0.5, np.nan], 24, "no mirrored pair scored"),
])
def test_each_cause_is_named(rewards, batch, cause):
    got = diagnose(np.array(rewards), Z, batch)
    if cause is None:
        assert got == "every coefficient rounds to 0 in Q16: alpha / sigma is too small"
    else:
        assert got is not None and cause in got, got


def test_a_step_with_signal_is_not_flagged():
    r = np.array([0.61, 0.6, 0.71, 0.7, 0.31, 0.3, 0.52, 0.5])
    assert diagnose(r, np.array([3, -3, 1, -1, -2, 2, 0, 0]), 24) is None
    # equal pairs cancel under member z-scores even with nonzero coefficients
    same = np.array([0.6, 0.6, 0.7, 0.7, 0.3, 0.3, 0.5, 0.5])
    assert "every mirrored pair differed by +0" in diagnose(same, np.array([1, 1, 5, 5, -6, -6, 0, 0]), 24)


def test_streak_and_alarm():
    t = [{"changed": 1}, {KEY: "a"}, {"changed": 2}, {KEY: "b"}, {KEY: "b"}, {KEY: "c"}]
    assert streak(t) == (3, "c") and streak(t[:3]) == (0, None) and streak([]) == (0, None)
    assert alarm(STREAK - 1, "x") is None and alarm(3, "c") == "no signal for the last 3 steps: c"


class Saturated(ToyTask):
    def rewards(self, model, batch):
        return np.ones(len(batch))


def test_the_trainer_records_no_signal_in_the_row(tmp_path):
    cfg = TrainConfig(task="toy", population=4, sigma=0.2, alpha=0.05, batch=2, window=5)
    drv, lg, run, tr = make(tmp_path, cfg, task=Saturated())
    for _ in range(3):
        rec = tr.step()
        assert rec.timings[KEY] == "the reward is saturated: every member scored 1 on the batch"
        assert rec.timings["changed"] == 0
    assert lg.verify(run.run_id) == 3  # in the hashed row
    assert [r.timings[KEY] for r in lg.steps(run.run_id)] == [rec.timings[KEY]] * 3
    drv2, lg2, run2, tr2 = make(tmp_path, cfg, seed=1)
    assert KEY not in tr2.step().timings  # a task with signal


@pytest.mark.slow
def test_train_log_and_report_show_a_run_without_signal(tmp_path):
    """A reward that is always 1 on the real model: every step is flagged as it is trained, the
    alarm comes at the third, and `log` and `report` show the steps from the ledger."""
    import json
    import os
    import subprocess
    import sys
    (tmp_path / "always.py").write_text("def reward(prompt, completion, example):\n    return 1.0\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"Say a word {i}."}) for i in range(10)) + "\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200", "QES_EDGE_HOME": str(tmp_path / "home")}

    def qes(*args):
        return subprocess.run([sys.executable, "-m", "qes_edge", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
    r = qes("train", "--task", "always:reward", "--data", "p.jsonl", "--population", 2, "--batch", 2,
            "--n-ctx", 128, "--threads", 2, "--steps", 3, "--ledger", "q.qes")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert out.count("no signal (the reward is saturated: every member scored 1 on the batch)") == 3, out
    assert "no signal for the last 3 steps: the reward is saturated" in out, out
    log = qes("log", "q.qes")
    assert log.returncode == 0 and log.stdout.count("no_signal the reward is saturated") == 3, log.stdout
    rep = qes("report", "q.qes", "--out", "r.html")
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "r.html").read_text()
    assert "steps without signal" in html and "3 (steps 0, 1, 2); no signal for the last 3 steps" in html


def test_status_shows_the_streak_of_the_run_it_shows(tmp_path):
    from rich.console import Console

    from qes_edge.agent import status
    cfg = TrainConfig(task="toy", population=4, sigma=0.2, alpha=0.05, batch=2, window=5)
    drv, lg, run, tr = make(tmp_path, cfg, task=Saturated())
    for _ in range(STREAK):
        tr.step()
    lg.close()
    info = status._run_progress(str(tmp_path / "toy0.qes"), run.run_id)
    assert info["no_signal_steps"] == STREAK and "saturated" in info["no_signal_cause"]
    info.update(job=1, state="running", target=10)
    con = Console(record=True, width=200)
    status.render({"daemon": {"running": False}, "run": info, "pauses": [], "queue": []}, con)
    assert f"no signal for the last {STREAK} steps: the reward is saturated" in con.export_text()


def test_status_picks_the_held_out_metric_and_best_step_as_export_does(tmp_path):
    """status shows balanced accuracy where the task records it (the metric `export --step best`
    ranks by), and the step that scored best, so a user sees a run that peaked before its end."""
    from rich.console import Console

    from qes_edge.agent import status
    cfg = TrainConfig(task="toy", population=4, sigma=0.2, alpha=0.05, batch=2, window=5)
    drv, lg, run, tr = make(tmp_path, cfg)
    for _ in range(3):
        tr.step()
    for step, acc, bal in [(0, 0.5, 0.50), (1, 0.8, 0.75), (2, 0.9, 0.75), (3, 0.7, 0.6)]:
        lg.record_eval(run.run_id, step, "heldout", {"accuracy": acc, "balanced_accuracy": bal})
    lg.close()
    info = status._run_progress(str(tmp_path / "toy0.qes"), run.run_id)
    assert info["heldout_metric"] == "balanced_accuracy"
    assert [h["value"] for h in info["heldout"]] == [0.5, 0.75, 0.75, 0.6]
    assert info["best_heldout"] == {"step": 1, "value": 0.75}  # the earliest of the ties
    info.update(job=1, state="running", target=10)
    con = Console(record=True, width=200)
    status.render({"daemon": {"running": False}, "run": info, "pauses": [], "queue": []}, con)
    assert "balanced_accuracy 0.500 → 0.600 (4 evaluations, best 0.750 at step 1)" in con.export_text()
