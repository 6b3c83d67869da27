"""qes-edge sync and qes-edge sync serve as a user runs them (fresh processes): over loopback
TCP and over a pseudo-terminal named as a serial device; exit codes 0 (done), 1 (the link
failed), 2 (refused), 3 (a fork); and, with the real model, a run trained on one side replays to
the same weights on the other."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qes_edge.ledger.store import Ledger
from qes_edge.sync import Options, serve_session
from qes_edge.sync.link import FdLink
from qes_edge.sync.testing import extend, synthetic_ledger

ROOT = Path(__file__).resolve().parent.parent


def env():
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "qes_edge", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=timeout)


class Server:
    """`qes-edge sync serve` in a process of its own, on a free loopback port."""

    def __init__(self, ledger: Path, *extra):
        self.p = subprocess.Popen([sys.executable, "-m", "qes_edge", "sync", "serve", "--ledger", str(ledger),
                                   "--on", "socket://127.0.0.1:0", "--timeout", "0.5", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        line = self.p.stderr.readline()
        m = re.search(r"listening on (socket://127\.0\.0\.1:\d+)", line)
        assert m, line + self.p.stderr.read()
        self.url = m.group(1)

    def stop(self) -> tuple[str, str]:
        if self.p.poll() is None:
            self.p.terminate()
        out, err = self.p.communicate(timeout=30)
        return out, err


def rows(path):
    lg = Ledger(path, readonly=True)
    try:
        return lg.db.execute("select * from steps order by step").fetchall()
    finally:
        lg.close()


def test_sync_over_tcp_then_up_to_date_then_json(tmp_path):
    src, dst = tmp_path / "jetson.qes", tmp_path / "laptop.qes"
    run_id = synthetic_ledger(src, 25)
    srv = Server(src)
    try:
        r = cli("sync", "--ledger", dst, "--peer", srv.url)
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(rf"received steps 0\.\.24 \(25 steps, [\d.]+ kB\) from {re.escape(srv.url)}; head "
                            r"[0-9a-f]{64}\n", r.stdout), r.stdout
        r = cli("sync", "--ledger", dst, "--peer", srv.url)
        assert r.returncode == 0 and r.stdout.startswith(f"up to date with {srv.url}: run {run_id}, 25 steps"), r.stdout
        lg = Ledger(src)
        extend(lg, run_id, 3)
        lg.close()
        r = cli("sync", "--ledger", dst, "--peer", srv.url, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert (out["action"], out["first"], out["last"], out["n_steps"]) == ("received", 25, 27, 28)
        assert out["bytes_in"] > 3 * 500 and out["head"] == out["peer_head"]
    finally:
        out, err = srv.stop()
    assert rows(dst) == rows(src)
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("sent steps 0..24 (25 steps") and "up to date" in lines[1]


def test_push_and_once(tmp_path):
    src, dst = tmp_path / "jetson.qes", tmp_path / "laptop.qes"
    synthetic_ledger(src, 12)
    srv = Server(dst, "--once", "--json")  # the server has no ledger yet: it receives one
    r = cli("sync", "--ledger", src, "--peer", srv.url)
    assert r.returncode == 0 and r.stdout.startswith("sent steps 0..11 (12 steps"), r.stdout + r.stderr
    srv.p.wait(30)
    out, err = srv.stop()
    assert srv.p.returncode == 0, err
    assert json.loads(out)["action"] == "received"
    assert rows(dst) == rows(src)


def test_fork_exits_3_and_a_refusal_exits_2(tmp_path):
    a, b = tmp_path / "a.qes", tmp_path / "b.qes"
    run_id = synthetic_ledger(a, 10)
    b.write_bytes(a.read_bytes())
    for path, seed in ((a, 1), (b, 2)):
        lg = Ledger(path)
        extend(lg, run_id, 4, seed=seed)
        lg.close()
    before = a.read_bytes(), b.read_bytes()
    srv = Server(b)
    try:
        r = cli("sync", "--ledger", a, "--peer", srv.url)
        assert r.returncode == 3, r.stdout + r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: fork at step 10: both hold steps 0..9")
        other = tmp_path / "other.qes"
        synthetic_ledger(other, 2, base_sha256="cd" * 32, base_name="other.gguf")
        r = cli("sync", "--ledger", other, "--peer", srv.url)
        assert r.returncode == 2 and "the peer's base model is SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr
    finally:
        out, _ = srv.stop()
    assert (a.read_bytes(), b.read_bytes()) == before
    assert "fork at step 10" in out and "refused" in out


def test_a_peer_that_is_not_there_and_a_dropped_link(tmp_path):
    src = tmp_path / "src.qes"
    synthetic_ledger(src, 3)
    # a port that accepts and never answers: the client gives up with exit 1 and nothing written
    import socket
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    try:
        t = time.monotonic()
        r = cli("sync", "--ledger", tmp_path / "new.qes", "--peer", f"socket://127.0.0.1:{port}", "--timeout", "0.1",
                "--retries", "1")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "no answer from" in r.stderr and "nothing was received" in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "new.qes").exists() and time.monotonic() - t < 60
    finally:
        s.close()


def test_sync_over_a_serial_device(tmp_path):
    """The client opens a pseudo-terminal by its device path, as it would /dev/ttyUSB0; the
    server answers on the pty's master side."""
    src, dst = tmp_path / "jetson.qes", tmp_path / "laptop.qes"
    synthetic_ledger(src, 20)
    master, slave = os.openpty()
    device = os.ttyname(slave)
    out = {}

    def srv():
        out["r"] = serve_session(FdLink(master, "pty master"), src, None, Options(timeout=0.5))[0]

    t = threading.Thread(target=srv, daemon=True)
    t.start()
    try:
        r = cli("sync", "--ledger", dst, "--peer", device, "--baud", "115200", "--timeout", "0.5")
    finally:
        t.join(60)
        os.close(slave)
    assert r.returncode == 0 and r.stdout.startswith("received steps 0..19 (20 steps"), r.stdout + r.stderr
    assert device in r.stdout and out["r"].action == "sent"
    assert rows(dst) == rows(src)


@pytest.mark.slow
def test_a_trained_run_replays_to_the_same_weights_on_the_other_side(tmp_path, default_model):
    """Train two steps on the real model, sync the ledger to an empty one over TCP, and replay
    both: the receiving side rebuilds the same weights, bit for bit."""
    import hashlib
    src, dst = tmp_path / "jetson.qes", tmp_path / "laptop.qes"
    r = cli("train", "--steps", "2", "--population", "2", "--batch", "2", "--n-ctx", "128", "--threads", "2",
            "--ledger", src, cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    srv = Server(src, "--once")
    r = cli("sync", "--ledger", dst, "--peer", srv.url)
    srv.p.wait(60)
    srv.stop()
    assert r.returncode == 0 and "received steps 0..1 (2 steps" in r.stdout, r.stdout + r.stderr
    outs = []
    for ledger in (src, dst):
        out = tmp_path / f"{ledger.stem}.gguf"
        r = cli("replay", "--ledger", ledger, "--out", out, "--threads", "2", cwd=tmp_path, timeout=1800)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        outs.append((r.stdout.strip().splitlines()[-1], hashlib.sha256(out.read_bytes()).hexdigest()))
    assert outs[0] == outs[1]  # the same head, and the same bytes of trained model
