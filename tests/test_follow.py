"""qes-edge follow on the real model: a run trained by `qes-edge train` (3 steps, a tiny
config) is followed over loopback TCP; the followed GGUF equals `qes-edge replay`'s byte for
byte and every step's weights hash matched; a follower started before the run is complete
catches each new step as it is recorded; a truncated or garbled link leaves the previous GGUF
intact; and the daemon serves the ledger it trains (`daemon run --serve`) to a follower."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qes_edge.ledger.store import Ledger
from qes_edge.sync import Listener, Options, serve, serve_session
from qes_edge.training.follow import follow
from qes_edge.sync.session import Incomplete
from qes_edge.sync.testing import FaultyLink

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
TRAIN = ["--task", "choice", "--population", "2", "--batch", "2", "--n-ctx", "128", "--threads", "2"]
FAST = Options(timeout=0.3, retries=2)


def env(home: Path | None = None, sysfs: Path | None = None) -> dict:
    e = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200",
         "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if home is not None:
        e["QES_EDGE_HOME"] = str(home)
    if sysfs is not None:
        e["QES_EDGE_SYSFS"] = str(sysfs)
    return e


def qes(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qes_edge", *map(str, args)], capture_output=True, text=True,
                          env=env(**kw), timeout=timeout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tiny_choice_data) -> Path:
    return tiny_choice_data


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """A 3-step run recorded by qes-edge train, and the GGUFs qes-edge replay writes after 1, 2
    and 3 of its steps (copies of the ledger cut to those steps)."""
    d = tmp_path_factory.mktemp("trained")
    r = qes("train", *TRAIN, "--steps", STEPS, "--data", data / "bigger.jsonl", "--ledger", d / "a.qes",
            home=d / "home")
    assert r.returncode == 0, r.stderr
    lg = Ledger(d / "a.qes", readonly=True)
    run = lg.run()
    recs = list(lg.steps(run.run_id))
    times = lg.step_times(run.run_id)
    info = lg.export_run(run.run_id)
    lg.close()
    out = {"ledger": d / "a.qes", "run_id": run.run_id, "info": info, "recs": recs, "times": times, "replayed": {}}
    for n in range(1, STEPS + 1):
        cut = d / f"cut{n}.qes"
        grow(cut, out, n)
        r = qes("replay", "--ledger", cut, "--out", d / f"replay{n}.gguf", "--threads", "2")
        assert r.returncode == 0, r.stderr
        out["replayed"][n] = sha(d / f"replay{n}.gguf")
    out["replay_gguf"] = d / f"replay{STEPS}.gguf"
    return out


def grow(path: Path, t: dict, n: int) -> None:
    """Bring the ledger at path to n steps of the trained run (created with its run row)."""
    lg = Ledger(path)
    try:
        if not any(r.run_id == t["run_id"] for r in lg.runs()):
            lg.import_run(t["info"])
        have = lg.head(t["run_id"])[0]
        for rec in t["recs"][have:n]:
            lg.append_received(t["run_id"], rec, t["times"].get(rec.step))
    finally:
        lg.close()


class ServerThread:
    """An in-process server on a free loopback port: serve() (read-only, as the daemon serves),
    or every connection wrapped in a FaultyLink."""

    def __init__(self, ledger: Path, fault: dict | None = None):
        self.listener = Listener("socket://127.0.0.1:0")
        self.url = self.listener.url
        self.stop = threading.Event()
        self.fault = fault
        self.sessions = []
        self.t = threading.Thread(target=self._run, args=(ledger,), daemon=True)
        self.t.start()

    def _run(self, ledger):
        if self.fault is None:
            serve(self.listener, ledger, None, FAST, stop=self.stop.is_set, readonly=True,
                  on_session=self.sessions.append)
            return
        while not self.stop.is_set():
            link = self.listener.accept(timeout=0.1)
            if link is None:
                continue
            r, _ = serve_session(FaultyLink(link, len(self.sessions), **self.fault), ledger, None, FAST,
                                 hello_wait=2.0, readonly=True)
            self.sessions.append(r)
            link.close()

    def close(self):
        self.stop.set()
        self.t.join(10)
        self.listener.close()


def test_follow_once_equals_replay_byte_for_byte(trained, tmp_path):
    srv = subprocess.Popen([sys.executable, "-m", "qes_edge", "sync", "serve", "--ledger", str(trained["ledger"]),
                            "--on", "socket://127.0.0.1:0", "--timeout", "0.5"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env())
    try:
        m = re.search(r"listening on (socket://127\.0\.0\.1:\d+)", srv.stderr.readline())
        assert m
        r = qes("follow", "--peer", m.group(1), "--out", tmp_path / "f.gguf", "--once", "--json", "--threads", "2",
                "--timeout", "0.5")
        assert r.returncode == 0, r.stderr
    finally:
        srv.terminate()
        srv.communicate(timeout=30)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    steps = [x for x in lines if "replay_s" in x and "event" not in x]
    assert [s["step"] for s in steps] == list(range(STEPS))
    assert all(s["train_s"] > 0 and s["replay_s"] > 0 and s["ratio"] == pytest.approx(s["replay_s"] / s["train_s"],
                                                                                      rel=1e-3) for s in steps)
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["steps"] == STEPS and summary["run_id"] == trained["run_id"]
    assert (tmp_path / "f.gguf").read_bytes() == trained["replay_gguf"].read_bytes()
    assert (tmp_path / "f.gguf.qes").exists() and not (tmp_path / "f.gguf.tmp").exists()
    # a second --once, nothing new: the weights rebuilt from the local ledger, the same bytes
    srv2 = ServerThread(trained["ledger"])
    try:
        r = qes("follow", "--peer", srv2.url, "--out", tmp_path / "f.gguf", "--once", "--threads", "2")
    finally:
        srv2.close()
    assert r.returncode == 0, r.stderr
    assert f"steps 0..{STEPS - 1} replayed" in r.stdout  # rebuilt in memory from the local ledger
    assert (tmp_path / "f.gguf").read_bytes() == trained["replay_gguf"].read_bytes()


def test_a_follower_catches_each_new_step(trained, tmp_path):
    src = tmp_path / "src.qes"
    grow(src, trained, 1)
    srv = ServerThread(src)
    stop = threading.Event()
    batches, errors = [], []

    def on_batch(b):
        batches.append((b.first, b.last, b.head, sha(tmp_path / "f.gguf")))

    def run():
        try:
            follow(srv.url, tmp_path / "f.qes", tmp_path / "f.gguf", interval=0.2, opts=FAST, threads=2, stop=stop,
                   on_batch=on_batch)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        for n in range(1, STEPS + 1):
            if n > 1:
                grow(src, trained, n)  # the trainer records a step
            deadline = time.monotonic() + 60
            while (not batches or batches[-1][1] != n - 1) and time.monotonic() < deadline and not errors:
                time.sleep(0.05)
            assert not errors, errors
            assert batches and batches[-1][1] == n - 1, batches
            assert batches[-1][2] == trained["recs"][n - 1].hash
            assert batches[-1][3] == trained["replayed"][n], f"the GGUF after step {n - 1} is not replay's"
    finally:
        stop.set()
        t.join(30)
        srv.close()
    assert [(b[0], b[1]) for b in batches] == [(n, n) for n in range(STEPS)]  # each step as it came
    assert not (tmp_path / "f.gguf.tmp").exists()


@pytest.mark.parametrize("fault", [{"disconnect_after": 1500}, {"flip": 0.02, "skip_frames": 1},
                                   {"truncate": 1.0, "skip_frames": 1}])
def test_a_broken_link_leaves_the_previous_gguf(trained, tmp_path, fault):
    src = tmp_path / "src.qes"
    grow(src, trained, 1)
    srv = ServerThread(src)
    try:
        f = follow(srv.url, tmp_path / "f.qes", tmp_path / "f.gguf", once=True, opts=FAST, threads=2)
    finally:
        srv.close()
    assert f.n == 1
    good = (tmp_path / "f.gguf").read_bytes()
    assert hashlib.sha256(good).hexdigest() == trained["replayed"][1]
    grow(src, trained, STEPS)
    bad = ServerThread(src, fault)
    try:
        with pytest.raises(Incomplete):
            follow(bad.url, tmp_path / "f.qes", tmp_path / "f.gguf", once=True, opts=FAST, threads=2)
    finally:
        bad.close()
    assert (tmp_path / "f.gguf").read_bytes() == good  # nothing came that replays: the old version
    assert not (tmp_path / "f.gguf.tmp").exists()
    lg = Ledger(tmp_path / "f.qes", readonly=True)
    assert lg.head(trained["run_id"])[0] == 1
    lg.close()
    srv = ServerThread(src)  # the link mended: it catches up
    try:
        f = follow(srv.url, tmp_path / "f.qes", tmp_path / "f.gguf", once=True, opts=FAST, threads=2)
    finally:
        srv.close()
    assert f.n == STEPS and sha(tmp_path / "f.gguf") == trained["replayed"][STEPS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_daemon_serves_its_ledger_to_a_follower_while_it_trains(data, trained, tmp_path):
    home, sysfs = tmp_path / "home", data / "sys"
    ledger = tmp_path / "d.qes"
    r = qes("queue", "add", *TRAIN, "--steps", STEPS, "--data", data / "bigger.jsonl", "--ledger", ledger,
            home=home, sysfs=sysfs)
    assert r.returncode == 0, r.stderr
    url = f"socket://127.0.0.1:{free_port()}"
    daemon = subprocess.Popen([sys.executable, "-m", "qes_edge", "daemon", "run", "--poll", "0.2", "--serve", url],
                              env=env(home, sysfs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    follower = subprocess.Popen([sys.executable, "-m", "qes_edge", "follow", "--peer", url, "--out",
                                 str(tmp_path / "f.gguf"), "--interval", "0.3", "--threads", "1", "--timeout", "0.5",
                                 "--json"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()

    def batches():
        return [json.loads(x) for x in list(lines) if x.startswith('{"event": "batch"')]
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and daemon.poll() is None and follower.poll() is None:
            if any(b["last"] == STEPS - 1 for b in batches()):  # the last step replayed and written
                break
            time.sleep(0.3)
        assert any(b["last"] == STEPS - 1 for b in batches()), (daemon.poll(), follower.poll(), lines)
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(60)
        reader.join(10)
        ferr = follower.stderr.read()
        fout = "".join(lines)
        daemon.send_signal(signal.SIGTERM)
        _, derr = daemon.communicate(timeout=120)
    assert follower.returncode == 0, ferr
    assert daemon.returncode == 0, derr
    assert "serving the ledger" in derr and "Traceback" not in derr + ferr
    steps = [json.loads(x) for x in fout.splitlines() if x.startswith("{")]
    assert sorted(s["step"] for s in steps if "replay_s" in s and "event" not in s) == list(range(STEPS))
    # the daemon's run replays (qes-edge replay) to the very bytes the follower wrote
    r = qes("replay", "--ledger", ledger, "--out", tmp_path / "r.gguf", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f.gguf").read_bytes() == (tmp_path / "r.gguf").read_bytes()
    assert not (tmp_path / "f.gguf.tmp").exists()


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.12])
def test_sigterm_while_writing_leaves_a_complete_gguf(trained, tmp_path, delay):
    """SIGTERM right as the GGUF of steps 1..2 is being written: the file is the earlier version
    (1 step) or the later one (3 steps), never anything else, and no temporary file is left."""
    src = tmp_path / "src.qes"
    grow(src, trained, 1)
    srv = ServerThread(src)
    try:
        follow(srv.url, tmp_path / "f.qes", tmp_path / "f.gguf", once=True, opts=FAST, threads=2)
        grow(src, trained, STEPS)
        p = subprocess.Popen([sys.executable, "-m", "qes_edge", "follow", "--peer", srv.url, "--out",
                              str(tmp_path / "f.gguf"), "--interval", "0.2", "--threads", "2"], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in p.stdout:
            if line.startswith(f"step {STEPS - 1}:"):  # the last replayed: the write comes next
                break
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        srv.close()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert sha(tmp_path / "f.gguf") in (trained["replayed"][1], trained["replayed"][STEPS])
    assert not (tmp_path / "f.gguf.tmp").exists()
