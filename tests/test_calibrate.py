"""qes-edge calibrate: the change-rate model against the rates measured on the real model, the
recommendation's rules on measured-like probes, and the command end to end on the real model
(its printed train command line runs)."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from qes_edge.training.calibrate import (AGREE, MIN_STEPS, TARGET_CHANGED_PER_STEP, Probe, alpha_for, change_rate,
                                recommend, resolution)


def test_change_rate_rises_with_alpha_and_matches_the_measured_run():
    rates = [change_rate(a, 0.01, 16, n=20_000, steps=30) for a in (0.0005, 0.001, 0.002)]
    assert rates[0] < rates[1] < rates[2]
    # issue 22's run (pairs, alpha 0.001, sigma 0.01, population 16): 13k-56k of 106M codes in its
    # first steps, ~160k later, i.e. 0.01%-0.15% of the codes a step
    assert 0.0007 < rates[1] < 0.002, rates
    assert abs(change_rate(0.001, 0.01, 16) - TARGET_CHANGED_PER_STEP) < 0.0004


def test_alpha_for_inverts_change_rate():
    a = alpha_for(change_rate(0.002, 0.01, 8), 0.01, 8, iters=12)
    assert 0.0017 < a < 0.0024, a
    assert alpha_for(TARGET_CHANGED_PER_STEP, 0.005, 16, iters=12) < alpha_for(TARGET_CHANGED_PER_STEP, 0.01, 16, iters=12)


def probe(sigma, agree, damage=0.05, spread=0.02, res=0.0, seconds=0.1):
    """A measured-like probe whose two batches' pair differences correlate exactly `agree`."""
    rng = np.random.default_rng(int(sigma * 1e4))
    a = rng.standard_normal(8)
    a = (a - a.mean()) / np.linalg.norm(a - a.mean())
    n = rng.standard_normal(8)
    n -= n.mean() + (n - n.mean()) @ a * a
    n /= np.linalg.norm(n)
    b = agree * a + np.sqrt(max(0.0, 1 - agree ** 2)) * n
    scale = spread / a.std() if spread else 0.0
    p = Probe(sigma=sigma, pairs=8, batch=24, base_heldout=0.5, member_heldout=[0.5 * (1 - damage)] * 16,
              diffs_a=(a * scale).tolist(), diffs_b=(b * scale).tolist(), resolution=res, prompts=1000,
              seconds=1000 * seconds)
    return p


def fixed_alpha(target, sigma, population, beta):
    return 0.001 * sigma / 0.01


def test_the_smallest_sigma_with_a_signal_that_does_little_harm_is_picked():
    probes = [probe(0.005, 0.1), probe(0.01, 0.8), probe(0.02, 0.9, damage=0.5)]
    assert [round(p.agreement, 1) for p in probes] == [0.1, 0.8, 0.9]
    rec = recommend(probes, hours=8, alpha_of=fixed_alpha)
    assert rec.sigma == 0.01 and rec.alpha == 0.001
    assert "the smallest whose pair differences are resolved and agree" in rec.reasons[0]


def test_population_and_batch_fit_the_budget():
    fast = recommend([probe(0.01, 0.9, seconds=0.01)], hours=8, alpha_of=fixed_alpha)
    assert (fast.population, fast.batch) == (32, 48) and fast.steps_in_budget >= MIN_STEPS
    slow = recommend([probe(0.01, 0.9, seconds=0.5)], hours=8, alpha_of=fixed_alpha)
    assert slow.steps_in_budget >= MIN_STEPS and slow.population * slow.batch < 32 * 48
    # a weak signal: the batch grows before the population
    weak = recommend([probe(0.01, 0.45, seconds=0.5)], hours=8, alpha_of=fixed_alpha)
    assert weak.population * weak.batch == slow.population * slow.batch and weak.batch >= weak.population
    short = recommend([probe(0.01, 0.9, seconds=1.0)], hours=0.5, alpha_of=fixed_alpha)
    assert (short.population, short.batch) == (8, 8) and "give it more time" in short.reasons[1]


def test_no_signal_anywhere_says_so():
    rec = recommend([probe(0.005, 0.0, spread=0.0), probe(0.01, 0.1)], hours=8, alpha_of=fixed_alpha)
    assert rec.sigma == 0.01 and f"corr >= {AGREE}" in rec.reasons[0] and "a larger batch" in rec.reasons[0]


def test_resolution_of_right_wrong_rewards():
    assert resolution(np.array([0.5, 0.25, 0.75]), 4) == 0.25
    assert resolution(np.array([0.51, 0.25]), 4) == 0.0
    unresolved = probe(0.01, 0.9, spread=0.01, res=0.25)
    assert not unresolved.resolved


@pytest.mark.slow
def test_calibrate_on_the_real_model_prints_a_train_command_that_runs(tiny_choice_data, tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "QES_EDGE_HOME": str(tmp_path / "home")}
    data = tiny_choice_data / "bigger.jsonl"
    r = subprocess.run([sys.executable, "-m", "qes_edge", "calibrate", "--task", "choice", "--data", str(data),
                        "--sigmas", "0.01,0.02", "--pairs", "2", "--batch", "4", "--heldout", "2", "--n-ctx", "128",
                        "--threads", "2", "--hours", "0.5", "--json"], capture_output=True, text=True, env=env,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 sigmas x 2 mirrored pairs, two batches of 4 and 2 held-out examples each: 84 prompts" in r.stderr
    out = json.loads(r.stdout)
    assert [p["sigma"] for p in out["probes"]] == [0.01, 0.02]
    assert all(len(p["diffs_a"]) == 2 and len(p["member_heldout"]) == 4 for p in out["probes"])
    rec = out["recommendation"]
    assert rec["sigma"] in (0.01, 0.02) and rec["alpha"] > 0 and rec["steps_in_budget"] > 0
    argv = shlex.split(out["command"])
    assert argv[:2] == ["qes-edge", "train"] and f"--sigma {rec['sigma']:g}" in out["command"]
    # the command line is one train accepts: run one step of it
    steps = argv.index("--steps")
    argv[steps + 1] = "1"
    t = subprocess.run([sys.executable, "-m", "qes_edge", *argv[1:], "--n-ctx", "128", "--threads", "2",
                        "--ledger", str(tmp_path / "c.qes")], capture_output=True, text=True, env=env, timeout=900,
                       cwd=tmp_path)
    assert t.returncode == 0, t.stderr


def test_the_held_out_evaluations_come_out_of_the_budget():
    """A run's held-out evaluations (start and end) cost prompts too: the steps get what is left,
    and where that is too little for the grid's size, a smaller population and batch."""
    free = recommend([probe(0.01, 0.9, seconds=0.1)], hours=1, alpha_of=fixed_alpha)
    taxed = recommend([probe(0.01, 0.9, seconds=0.1)], hours=1, alpha_of=fixed_alpha, eval_prompts=900)
    assert (taxed.population, taxed.batch) == (free.population, free.batch)
    g = free.population * free.batch * 0.1 * 1.05
    assert free.steps_in_budget == int(3600 / g) and taxed.steps_in_budget == int((3600 - 90) / g)
    assert "after 2 min of held-out evaluations" in taxed.reasons[1] and "held-out" not in free.reasons[1]
    squeezed = recommend([probe(0.01, 0.9, seconds=0.1)], hours=1, alpha_of=fixed_alpha, eval_prompts=9000)
    assert squeezed.population * squeezed.batch < free.population * free.batch
    assert squeezed.steps_in_budget * squeezed.population * squeezed.batch * 0.1 * 1.05 <= 3600 - 900


def test_a_batch_never_holds_more_than_the_training_examples():
    rec = recommend([probe(0.01, 0.9, seconds=0.001)], hours=8, alpha_of=fixed_alpha, n_train=8)
    assert rec.batch == 8 and rec.population == 32
