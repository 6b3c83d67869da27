"""The daemon on the real model: kill -9 at random moments and at named points (a member
mid-evaluation, the update half applied, the step row written but not committed), SIGTERM in
the middle of a step, a full disk under the ledger, a pause shown by status, status read while
the daemon writes.  Each time the final ledger equals the one an uninterrupted foreground
`qes-edge train` records with the same options, and no recorded step is ever lost."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fill_disk, recorded_steps

pytestmark = pytest.mark.slow

STEPS = 8
TRAIN = ["--task", "choice", "--population", "2", "--batch", "2", "--n-ctx", "128", "--threads", "2",
         "--steps", str(STEPS)]


def env_for(home: Path, sysfs: Path, **extra) -> dict:
    return {**os.environ, "QES_EDGE_HOME": str(home), "QES_EDGE_SYSFS": str(sysfs), "OMP_WAIT_POLICY": "PASSIVE",
            **extra}


def qes(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data(tiny_choice_data) -> Path:
    return tiny_choice_data


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> tuple[list, float]:
    """The steps an uninterrupted foreground `qes-edge train` records, and how long that whole
    process took on this machine, now (the scale of the kill test's random moments)."""
    d = tmp_path_factory.mktemp("ref")
    t0 = time.monotonic()
    r = qes(["train", *TRAIN, "--data", str(data / "bigger.jsonl"), "--ledger", str(d / "ref.qes")],
            env_for(d / "home", data / "sys"))
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    return steps_of(d / "ref.qes"), wall


@pytest.fixture(scope="module")
def reference(reference_run) -> list:
    return reference_run[0]


steps_of = recorded_steps


def same_training(got: list, want: list) -> bool:
    """Seeds, coefficients, rewards, weights hashes and failures equal (row hashes cover timings,
    which differ)."""
    return [g[:5] for g in got] == [w[:5] for w in want]


def queue(home, data, ledger, sysfs):
    r = qes(["queue", "add", *TRAIN, "--data", str(data / "bigger.jsonl"), "--ledger", str(ledger)],
            env_for(home, sysfs))
    assert r.returncode == 0, r.stderr


def start(home, sysfs, **extra):
    return subprocess.Popen([sys.executable, "-m", "qes_edge", "daemon", "run", "--exit-when-empty", "--poll", "0.2"],
                            env=env_for(home, sysfs, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def recorded(ledger: Path) -> list:
    if not ledger.exists():
        return []
    try:
        return steps_of(ledger)
    except Exception:  # noqa: BLE001 - the run row may not exist yet
        return []


def n_recorded(ledger: Path) -> int:
    """Steps in the ledger now (0 before it exists), read while the daemon may be writing it."""
    import sqlite3
    if not ledger.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("select count(*) from steps").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # the schema may not be there yet
        return 0


def kill_within_one_step(p: subprocess.Popen, ledger: Path, at: float, n_before: int) -> tuple[int, str]:
    """kill -9 at `at` seconds after the start, or as soon as the process has recorded one more
    step than n_before, whichever comes first: a moment at random in its start-up, its catch-up
    or its first step, and never more than one step of progress, however fast the machine is.
    Returns the exit code and what set the moment off."""
    t0 = time.monotonic()
    while True:
        code = p.poll()
        if code is not None:
            return code, "exited"
        if time.monotonic() - t0 >= at:
            why = f"{at:.2f} s"
            break
        if n_recorded(ledger) > n_before:
            why = f"step {n_before} recorded"
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    return p.wait(60), why


def test_kill_9_anywhere_loses_nothing(data, reference_run, tmp_path):
    """≥ 10 kills: 5 at random moments, 6 at named points; after each the ledger verifies and
    every step recorded before the kill is still there, unchanged; the last start finishes the
    run, equal to the uninterrupted one.

    The random moments scale with this machine's speed, measured in the same test: each lies
    uniformly in [0.05, 0.6] × the wall time of the uninterrupted `train` process, and a kill
    comes at the latest when its process records its first step, so each process makes at most
    one step and the 11 kills cannot finish the 8-step run, on an idle machine or a busy one."""
    reference, ref_wall = reference_run
    home, ledger, sysfs = tmp_path / "home", tmp_path / "run.qes", data / "sys"
    queue(home, data, ledger, sysfs)
    rng = random.Random(13)
    # random moments first (start-up, catch-up, evaluation, a step), then the named points, each
    # reached within a process's first two steps: 11 kills make at most ~7 of the 8 steps
    plan = [rng.uniform(0.05, 0.6) * ref_wall for _ in range(5)] + \
           ["member:1", "update:1", "ledger-write:1", "member:2", "ledger-write:2", "update:2"]
    kills, before, log = 0, [], []
    for what in plan:
        if isinstance(what, str):
            p = start(home, sysfs, QES_EDGE_CRASH_AT=what)
            code, why = p.wait(300), what
        else:
            p = start(home, sysfs)
            code, why = kill_within_one_step(p, ledger, what, len(before))
        if code == 0:  # the run finished before this kill came
            log.append((why, "finished"))
            break
        assert code == -signal.SIGKILL, p.stderr.read()
        kills += 1
        now = recorded(ledger)
        assert now[:len(before)] == before, f"a recorded step changed or vanished after the kill at {why}"
        assert same_training(now, reference[:len(now)])
        log.append((why, len(now)))
        before = now
    assert kills >= 10, (ref_wall, log)
    p = start(home, sysfs)
    assert p.wait(600) == 0, p.stderr.read()
    final = steps_of(ledger)
    assert final[:len(before)] == before and same_training(final, reference), log
    text = (home / "daemon.log").read_text()
    assert "every weights hash checked" in text and f"job 1: done, {STEPS} steps" in text
    print(f"kill -9: {kills} kills, {len(before)} steps recorded before the last, 0 lost; "
          f"reference run {ref_wall:.1f} s; plan {log}")


def test_sigterm_mid_step_then_resume_and_status_while_writing(data, reference, tmp_path):
    home, ledger, sysfs = tmp_path / "home", tmp_path / "run.qes", data / "sys"
    queue(home, data, ledger, sysfs)
    # SIGTERM while step 1's first member is evaluated (the weights perturbed): the step is
    # abandoned before its second member, the weights restored and checked
    p = start(home, sysfs, QES_EDGE_CRASH_AT="member:3:TERM")
    assert p.wait(300) == 0, p.stderr.read()
    text = (home / "daemon.log").read_text()
    assert "SIGTERM received" in text
    assert ("job 1: step 1 abandoned after 1 of 2 members; the weights are restored (hash "
            f"{reference[0][3][:12]}… equals step 0's)") in text, text
    assert same_training(steps_of(ledger), reference[:1])
    # SIGTERM at any moment, while status is read as the daemon writes
    p = start(home, sysfs)
    statuses = []
    deadline = time.time() + 300
    while len(recorded(ledger)) < 3:  # status, read while the daemon writes, never fails
        assert time.time() < deadline and p.poll() is None
        r = qes(["status", "--json"], env_for(home, sysfs), timeout=60)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        if info["daemon"]["running"] or statuses:  # from the moment it holds the lock
            statuses.append(info)
    # into the next step's members: right after the process records its next step (a moment the
    # run itself gives, not a fixed second, so a fast machine cannot finish the run first)
    n_seen = n_recorded(ledger)
    while n_recorded(ledger) == n_seen and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(120) == 0
    steps = [s["run"]["step"] for s in statuses if s.get("run") and "step" in s["run"]]
    assert steps and steps == sorted(steps) and all(s["daemon"]["running"] for s in statuses)
    assert (home / "daemon.log").read_text().count("SIGTERM received") == 2
    n = len(steps_of(ledger))
    assert 3 <= n < STEPS and same_training(steps_of(ledger), reference[:n])
    info = json.loads(qes(["status", "--json"], env_for(home, sysfs)).stdout)
    assert info["daemon"]["running"] is False and info["queue"][0]["state"] == "running"
    # the next start resumes at the step it abandoned and ends where the uninterrupted run ends
    p = start(home, sysfs)
    assert p.wait(600) == 0, p.stderr.read()
    assert same_training(steps_of(ledger), reference)
    human = qes(["status"], env_for(home, sysfs)).stdout
    assert f"step {STEPS}/{STEPS}" in human and "reward" in human and "memory: peak" in human


def test_a_full_disk_stops_the_daemon_with_the_ledger_intact(data, reference, small_disk, tmp_path):
    home, ledger, sysfs = tmp_path / "home", small_disk / "run.qes", data / "sys"
    queue(home, data, ledger, sysfs)
    p = start(home, sysfs)
    deadline = time.time() + 300
    while len(recorded(ledger)) < 1:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.2)
    filler = fill_disk(small_disk)
    assert p.wait(300) == 1
    text = (home / "daemon.log").read_text()
    line = next(x for x in text.splitlines() if "could not be written" in x)
    assert "stopping the daemon" in line and "the ledger is intact" in line, line
    n = len(steps_of(ledger))
    assert n >= 1 and same_training(steps_of(ledger), reference[:n])
    filler.unlink()
    p = start(home, sysfs)
    assert p.wait(600) == 0, p.stderr.read()
    assert same_training(steps_of(ledger), reference)


def test_status_shows_a_pause_on_battery(data, tmp_path):
    home, ledger, sysfs = tmp_path / "home", tmp_path / "run.qes", tmp_path / "sys"
    bat = sysfs / "class/power_supply/BAT0"
    bat.mkdir(parents=True)
    (bat / "type").write_text("Battery\n")
    (bat / "status").write_text("Discharging\n")
    (bat / "capacity").write_text("64\n")
    queue(home, data, ledger, sysfs)
    p = start(home, sysfs)
    try:
        deadline = time.time() + 300
        while True:
            info = json.loads(qes(["status", "--json"], env_for(home, sysfs)).stdout)
            if info["daemon"].get("status") == "paused":
                break
            assert time.time() < deadline and p.poll() is None
            time.sleep(0.3)
        assert info["daemon"]["pause_reason"] == "on battery (64%)"
        human = qes(["status"], env_for(home, sysfs)).stdout
        assert "paused since" in human and "on battery (64%)" in human
        (bat / "status").write_text("Charging\n")  # plugged in: it resumes and finishes
        assert p.wait(600) == 0
    finally:
        if p.poll() is None:
            p.kill()
    events = qes(["status", "--json"], env_for(home, sysfs)).stdout
    pauses = [e["message"] for e in json.loads(events)["pauses"]]
    assert pauses[0] == "pause: on battery (64%)" and pauses[1].startswith("resume after a ")
