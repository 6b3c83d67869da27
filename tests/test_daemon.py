"""The daemon without a model: the lock (two daemons on one home), budgets, the gate's pauses and
resumes on a faked sysfs, the queue and its checks, status on an empty or stopped home, and the
service unit that `daemon install --dry-run` prints."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qes_edge.agent.daemon import (Daemon, DaemonConfig, DaemonError, HomeLock, parse_clock, parse_duration, running_pid)
from qes_edge.agent.db import DaemonDB


def qes(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "qes_edge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("QES_EDGE_HOME", str(h))
    return h


def fake_sysfs(root: Path, on_battery: bool, temp_c: float = 40.0) -> Path:
    """A Linux sysfs with one battery, one charger and one thermal zone."""
    bat, ac, tz = (root / "class/power_supply/BAT0", root / "class/power_supply/AC",
                   root / "class/thermal/thermal_zone0")
    for d in (bat, ac, tz):
        d.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "status").write_text("Discharging\n" if on_battery else "Charging\n")
    (bat / "capacity").write_text("37\n")
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("0\n" if on_battery else "1\n")
    (tz / "type").write_text("x86_pkg_temp\n")
    (tz / "temp").write_text(f"{int(temp_c * 1000)}\n")
    return root


def test_durations_and_clock_times():
    assert parse_duration("90") == 90 and parse_duration("45m") == 2700 and parse_duration("1h30m") == 5400
    for bad in ("", "8x", "h", "1h30", "-5m"):
        with pytest.raises(ValueError, match="cannot read the duration"):
            parse_duration(bad)
    now = dt.datetime(2026, 11, 27, 23, 0)
    assert parse_clock("07:00", now) == dt.datetime(2026, 11, 28, 7, 0)
    assert parse_clock("23:30", now) == dt.datetime(2026, 11, 27, 23, 30)
    with pytest.raises(ValueError, match="HH:MM"):
        parse_clock("7am", now)


def test_a_second_daemon_on_the_same_home_refuses(home):
    first = subprocess.Popen([sys.executable, "-m", "qes_edge", "daemon", "run", "--poll", "0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120  # a hang, not a slow machine
        while running_pid(home / "daemon.lock") != first.pid:
            assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() else ""
            time.sleep(0.1)
        second = qes("daemon", "run", "--exit-when-empty")
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: another qes-edge daemon (pid {first.pid}) is running on {home}: "
                                         "stop it with `qes-edge daemon stop`, or give another QES_EDGE_HOME")
        # in-process too: the lock is an flock, per open file description
        with pytest.raises(DaemonError, match=f"pid {first.pid}"):
            HomeLock(home / "daemon.lock").acquire()
        # stop: SIGTERM, a clean exit, the lock released, the stop logged
        res = qes("daemon", "stop", "--timeout", "30")
        assert res.returncode == 0 and f"daemon (pid {first.pid}) stopped" in res.stdout
        assert first.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert running_pid(home / "daemon.lock") is None
    log = (home / "daemon.log").read_text()
    assert "SIGTERM received" in log and "daemon stopped: stop requested" in log
    assert qes("daemon", "stop").stdout.strip() == "no daemon was running"


def test_a_killed_daemon_leaves_no_stale_lock(home):
    d = subprocess.Popen([sys.executable, "-m", "qes_edge", "daemon", "run", "--poll", "0.2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120  # a hang, not a slow machine
    while json.loads(qes("status", "--json").stdout)["daemon"].get("status") != "idle":
        assert time.time() < deadline
        time.sleep(0.2)
    d.send_signal(signal.SIGKILL)
    d.wait()
    assert running_pid(home / "daemon.lock") is None
    info = json.loads(qes("status", "--json").stdout)
    assert info["daemon"]["running"] is False and "was killed or crashed" in info["daemon"]["status"]
    assert info["daemon"]["idle_rss_mb"] > 10
    res = qes("daemon", "run", "--exit-when-empty")
    assert res.returncode == 0 and "the queue is empty" in res.stderr


def test_budgets_stop_the_daemon(home):
    for cfg, want in ((DaemonConfig(max_steps=0), "budget: 0 steps trained (--max-steps 0)"),
                      (DaemonConfig(max_wall_s=0), "of wall time (--max-wall 0 s)"),
                      (DaemonConfig(stop_at=dt.datetime.now() - dt.timedelta(seconds=1)), "(--stop-at)")):
        d = Daemon(home, cfg)
        assert d.run() == 0
        assert want in d._stop_reason
    db = DaemonDB(home / "daemon.db", readonly=True)
    assert [e["message"].split(": ", 1)[1][:6] for e in db.events(kinds=("stop",))] == ["budget"] * 3


def test_the_gate_pauses_on_battery_and_heat_and_logs_each_pause(home, tmp_path, monkeypatch):
    sysfs = fake_sysfs(tmp_path / "sys", on_battery=True)
    monkeypatch.setenv("QES_EDGE_SYSFS", str(sysfs))
    d = Daemon(home, DaemonConfig(poll_s=0.01, max_temp_c=80))
    d.db = DaemonDB(home / "daemon.db")
    calls = []
    real_wait = d.stop.wait

    def wait(t):  # the machine changes while the daemon is paused
        calls.append(t)
        if len(calls) == 3:
            fake_sysfs(sysfs, on_battery=False, temp_c=91.5)   # plugged in, but hot
        if len(calls) == 6:
            fake_sysfs(sysfs, on_battery=False, temp_c=77.0)   # cooler, above limit - 5: still paused
        if len(calls) == 9:
            fake_sysfs(sysfs, on_battery=False, temp_c=60.0)
        return real_wait(t)
    d.stop.wait = wait
    assert d.gate(job_id=None) is None
    assert len(calls) == 9
    msgs = [e["message"] for e in d.db.events(kinds=("pause", "resume"))]
    assert msgs[0] == "pause: on battery (37%)"
    assert len(msgs) == 3 and "91.5 °C > 80 °C" in msgs[1]   # the cause changed: logged once
    assert msgs[2].startswith("resume after a ") and "cooling down" in msgs[2]
    assert d.db.state()["status"] == "training" and d.db.state()["pause_reason"] is None
    # a stop request ends a pause at once
    fake_sysfs(sysfs, on_battery=True)
    d.stop.set()
    assert d.gate() == "stop requested"
    d.db.close()


def test_queue_add_checks_like_train_and_stores_absolute_paths(home, tmp_path, default_model, monkeypatch):
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "choices": ["a", "b"], "answer": i % 2})
                              for i in range(10)))
    monkeypatch.chdir(tmp_path)
    res = qes("queue", "add", "--task", "choice", "--data", "t.jsonl", "--steps", "7", "--population", "4",
              "--ledger", "r.qes")
    assert res.returncode == 0, res.stderr
    jobs = [json.loads(x) for x in qes("queue", "list", "--json").stdout.splitlines()]
    assert len(jobs) == 1 and jobs[0]["state"] == "queued" and jobs[0]["steps"] == 7
    assert jobs[0]["ledger"] == str(tmp_path / "r.qes") and Path(jobs[0]["model"]).is_absolute()
    assert sorted(jobs[0]["options"]["explicit"]) == ["data", "population", "task"]
    db = DaemonDB(home / "daemon.db", readonly=True)
    assert db.jobs()[0].options["cfg"]["data"] == str(data)
    db.close()
    for args, msg in (
        (["--population", "3"], "population must be an even number"),
        (["--task", "choice", "--data", "missing.jsonl"], "data file not found"),
        (["--model", "missing.gguf"], "model file not found: missing.gguf"),
        (["--nosuch"], "No such option: --nosuch"),
        (["--json"], "--json is for the foreground train"),
        (["--task", "choice", "--data", "t.jsonl", "--ledger", "r.qes"], "job 1 (queued) already trains"),
        (["--resume", "--new-run"], "give one of them"),
    ):
        res = qes("queue", "add", *args)
        assert res.returncode == 2 and res.stderr.count("error:") == 1 and msg in res.stderr, (args, res.stderr)
    assert qes("queue", "remove", "9").stderr.strip() == "error: no job 9 in the queue"
    assert qes("queue", "remove", "1").returncode == 0
    assert [json.loads(x)["state"] for x in qes("queue", "list", "--json").stdout.splitlines()] == ["removed"]


def test_status_of_a_home_that_never_ran_a_daemon(home):
    res = qes("status")
    assert res.returncode == 0 and "never started on this home" in res.stdout and "queue: empty" in res.stdout
    info = json.loads(qes("status", "--json").stdout)
    assert info == {"home": str(home), "daemon": {"running": False, "pid": None}, "queue": [], "run": None,
                    "pauses": []}


def test_bad_daemon_options_are_one_line(home):
    for args, msg in ((["--max-wall", "8x"], "cannot read the duration '8x'"),
                      (["--stop-at", "7am"], "HH:MM"),
                      (["--ionice", "fast"], "ionice"),
                      (["--nice", "40"], "--nice")):
        res = qes("daemon", "run", "--exit-when-empty", *args)
        assert res.returncode == 2 and res.stderr.count("error:") == 1 and msg in res.stderr, (args, res.stderr)
    assert not (home / "daemon.lock").exists()


def test_install_dry_run_prints_a_unit_that_runs_the_daemon(home):
    res = qes("daemon", "install", "--dry-run")
    assert res.returncode == 0
    if sys.platform == "darwin":
        assert "org.qes-edge.daemon" in res.stdout
    else:
        assert "[Service]" in res.stdout and "daemon run" in res.stdout and f"QES_EDGE_HOME={home}" in res.stdout


def test_a_job_that_hits_a_bug_fails_and_the_daemon_goes_on(home, monkeypatch):
    """An unexpected exception in a job (a bug) marks that job failed with the traceback in the log;
    the daemon goes on with the queue instead of dying (a restarted daemon would retry it forever)."""
    import qes_edge.training.session as session_mod
    db = DaemonDB(home / "daemon.db")
    for i in range(2):
        db.add_job({"cfg": {}, "explicit": []}, 3, 0, str(home / f"r{i}.qes"), "/nowhere/m.gguf", "sentiment")
    db.close()

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(session_mod.Session, "open", classmethod(boom))
    assert Daemon(home, DaemonConfig(exit_when_empty=True)).run() == 0
    db = DaemonDB(home / "daemon.db", readonly=True)
    assert [(j.state, j.error) for j in db.jobs()] == [("failed", "ZeroDivisionError: a bug")] * 2
    log = (home / "daemon.log").read_text()
    assert "Traceback" in log and "job 2 failed on an unexpected error" in log
