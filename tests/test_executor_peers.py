"""The shared population (qes_edge/training/executors/peers.py, docs/sync-protocol.md §9): a coordinator and
workers over socket pairs on a toy model (no llama.cpp) give exactly the ledger of one process;
a worker that drops mid-step has its members evaluated by the coordinator; a worker that cannot
hold the run is left out.  The slow test runs the real model in two processes over TCP."""

import json
import math
import threading

import numpy as np
import pytest

from qes_edge.training.executors.peers import PeerExecutor, Worker, split_members
from qes_edge.ledger.store import Ledger
from qes_edge.sync import messages as M
from qes_edge.sync.link import LinkClosed
from qes_edge.sync.testing import socket_pair
from qes_edge.training.config import TrainConfig
from qes_edge.training.trainer import Trainer
from test_trainer_unit import ToyDriver, ToyTask

CFG = dict(task="toy", population=8, sigma=0.2, alpha=0.05, batch=2, window=5)


def run_local(tmp_path, n_steps, name="one"):
    cfg = TrainConfig(**CFG)
    lg = Ledger(tmp_path / f"{name}.qes")
    run = lg.create_run("00" * 32, "toy.gguf", cfg.record(), 1)
    tr = Trainer(ToyDriver(0), ToyTask(), lg, run, cfg)
    for _ in range(n_steps):
        tr.step()
    return lg, run


def toy_opener(info):
    return ToyDriver(0), ToyTask(), 0


def start_worker(tmp_path, name, link, opener=toy_opener, wrap=None):
    w = Worker(tmp_path / f"{name}.qes", opener)
    out = {}

    def go():
        try:
            out["why"] = w.serve_link(wrap(link) if wrap else link)
        except LinkClosed as e:
            out["why"] = f"closed: {e}"
        finally:
            link.close()
    th = threading.Thread(target=go, daemon=True)
    th.start()
    return w, th, out


def coordinator(tmp_path, links, name="two", **kw):
    cfg = TrainConfig(**CFG)
    lg = Ledger(tmp_path / f"{name}.qes")
    run = lg.create_run("00" * 32, "toy.gguf", cfg.record(), 1)
    drv = ToyDriver(0)
    tr = Trainer(drv, ToyTask(), lg, run, cfg)
    said = []
    ex = PeerExecutor(tr.executor, links, timeout=kw.pop("timeout", 30.0), say=said.append, **kw)
    ex.bind(lg, run.run_id)
    tr.executor = ex
    return tr, lg, run, ex, said


def rows(lg, run):
    return [(r.step, r.seeds.tolist(), r.coefs_q16.tolist(), r.rewards.tobytes(), r.weights_sha256, r.failures)
            for r in lg.steps(run.run_id)]


def test_split_keeps_mirrored_pairs_together():
    for n in (2, 4, 8, 10, 16):
        for parts in (1, 2, 3, 5):
            shares = split_members(n, parts)
            assert len(shares) == parts
            assert np.array_equal(np.concatenate(shares), np.arange(n))
            assert all(len(s) % 2 == 0 and (not len(s) or s[0] % 2 == 0) for s in shares)
            assert max(map(len, shares)) - min(map(len, shares)) <= 2


def test_shares_gathered_from_several_places_come_back_in_member_order():
    """Gathered, as the peer and Ray executors use it: shares arrive in any order, rewards and
    parts land at their members, failures come out by member, the members' phases are summed
    and the executor's own timings sit beside them."""
    from qes_edge.training.executors.local import Gathered
    g = Gathered(6)
    assert g.evaluation().parts is None and np.isnan(g.evaluation().rewards).all()
    g.add(np.arange(4, 6), [0.5, 0.6], {5: "member 5 (seed 9): timeout"}, {"eval_s": 2.0, "peer_wait_s": 7.0},
          [{"a": 0.5}, None])
    g.add(np.arange(0, 2), [0.1, 0.2], {0: "member 0 (seed 3): bad"}, {"perturb_s": 0.25, "eval_s": 1.0})
    e = g.evaluation(remote_members=2)
    assert e.rewards.tolist()[:2] == [0.1, 0.2] and e.rewards.tolist()[4:] == [0.5, 0.6]
    assert np.isnan(e.rewards[2:4]).all()
    assert e.failures == ["member 0 (seed 3): bad", "member 5 (seed 9): timeout"]
    assert e.parts == [None, None, None, None, {"a": 0.5}, None]
    assert e.timings == {"perturb_s": 0.25, "eval_s": 3.0, "restore_s": 0.0, "remote_members": 2}


def test_messages_round_trip_bit_for_bit():
    e = M.Evaluate(3, 7, [2, 3], [11, -11], [0, 5], 7, "ab" * 32)
    assert M.decode_evaluate(M.evaluate(e)) == e
    vals = [0.1 + 0.2, float("nan"), -1e-300, 1 / 3]
    r = M.decode_rewards(M.rewards(M.Rewards(3, 7, [0, 1, 2, 3], vals, ["member 1 (seed 5): x"], {"eval_s": 1.5},
                                             7, "cd" * 32)))
    assert np.array(r.rewards).tobytes() == np.array(vals).tobytes()
    for bad in (b"{}", b"[1]", M.evaluate(M.Evaluate(1, 2, [0], [0], [1], 2, "ab" * 32)),
                M.evaluate(M.Evaluate(1, 2, [0, 1], [3], [1], 2, "ab" * 32))):
        with pytest.raises(M.MessageError):
            M.decode_evaluate(bad)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_shared_population_gives_the_one_process_ledger(tmp_path, n_workers):
    lg1, run1 = run_local(tmp_path, 6)
    pairs = [socket_pair() for _ in range(n_workers)]
    workers = [start_worker(tmp_path, f"w{i}", b) for i, (a, b) in enumerate(pairs)]
    tr, lg2, run2, ex, said = coordinator(tmp_path, [a for a, b in pairs])
    for _ in range(6):
        tr.step()
    assert rows(lg2, run2) == rows(lg1, run1)
    assert all(p.alive and p.members > 0 for p in ex.peers), said
    assert all(r.timings["remote_members"] == 8 * n_workers // (n_workers + 1) // 2 * 2 for r in lg2.steps(run2.run_id))
    ex.close()
    for w, th, out in workers:
        th.join(10)
        assert out["why"] in ("bye", "the coordinator hung up")
        # the worker holds steps 0..4 (it evaluated step 5 from them), chained as the coordinator's
        wl = Ledger(w.ledger_path, readonly=True)
        assert [r.hash for r in wl.steps(run2.run_id)] == [r.hash for r in lg2.steps(run2.run_id)][:5]


class DropAfter:
    """A link that hangs up once it has carried `n` evaluate frames to the worker."""

    def __init__(self, inner, n):
        self.inner, self.n, self.name = inner, n, "drop"

    def read(self, timeout):
        data = self.inner.read(timeout)
        if b"QES\xa7\x01\x10" in data:  # a frame of type 16
            self.n -= 1
            if self.n < 0:
                self.inner.close()
                raise LinkClosed("dropped mid-step")
        return data

    def write(self, data):
        self.inner.write(data)

    def close(self):
        self.inner.close()


def test_a_worker_that_drops_mid_step_has_its_members_evaluated_here(tmp_path):
    lg1, run1 = run_local(tmp_path, 5)
    (a, b), (c, d) = socket_pair(), socket_pair()
    start_worker(tmp_path, "w0", b, wrap=lambda link: DropAfter(link, 2))  # drops at step 2
    start_worker(tmp_path, "w1", d)
    tr, lg2, run2, ex, said = coordinator(tmp_path, [a, c])
    for _ in range(5):
        tr.step()
    assert rows(lg2, run2) == rows(lg1, run1)
    assert not ex.peers[0].alive and ex.peers[1].alive
    assert any("left out" in s for s in said), said
    remote = [r.timings["remote_members"] for r in lg2.steps(run2.run_id)]
    assert remote[:2] == [4, 4] and remote[3:] == [4, 4], remote  # 2 + 2 of 8, then the live worker's 4
    ex.close()


def test_a_worker_that_cannot_hold_the_run_is_left_out(tmp_path):
    lg1, run1 = run_local(tmp_path, 3)
    a, b = socket_pair()

    def refuse(info):
        raise ValueError("base model sha256 differs")
    start_worker(tmp_path, "w0", b, opener=refuse)
    tr, lg2, run2, ex, said = coordinator(tmp_path, [a])
    assert not ex.peers[0].alive and "base model sha256 differs" in ex.peers[0].why
    assert not (tmp_path / "w0.qes").exists()  # refused before its ledger was touched
    for _ in range(3):
        tr.step()
    assert rows(lg2, run2) == rows(lg1, run1)


def test_a_worker_that_missed_a_row_says_so_and_catches_up(tmp_path):
    """A lost step frame: the worker answers 'behind', its members are evaluated here, and the
    next step's request carries the rows it lacks."""
    lg1, run1 = run_local(tmp_path, 5)
    a, b = socket_pair()

    class LoseStep:
        name, lost = "lose", False

        def __init__(self, inner):
            self.inner = inner

        def read(self, timeout):
            data = self.inner.read(timeout)
            i = data.find(b"QES\xa7\x01\x06")
            if i >= 0 and not LoseStep.lost:  # a step frame: lose its first byte (the CRC drops it)
                LoseStep.lost = True
                data = data[:i] + data[i + 1:]
            return data

        def write(self, data):
            self.inner.write(data)

        def close(self):
            self.inner.close()
    w, th, out = start_worker(tmp_path, "w0", b, wrap=LoseStep)
    tr, lg2, run2, ex, said = coordinator(tmp_path, [a])
    for _ in range(5):
        tr.step()
    assert rows(lg2, run2) == rows(lg1, run1)
    assert ex.peers[0].alive
    remote = [r.timings["remote_members"] for r in lg2.steps(run2.run_id)]
    assert remote[1] == 0 and remote[0] == remote[2] == remote[4] == 4, remote
    ex.close()


# -- the real model: a coordinator and a worker process over loopback TCP -------------------------

def _qes(args, **kw):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "qes_edge", *args], env=env, text=True, **kw)


def _steps(path):
    lg = Ledger(path, readonly=True)
    try:
        run = lg.run()
        lg.verify(run.run_id)
        return [(r.seeds.tolist(), r.coefs_q16.tolist(), r.rewards.tobytes(), r.weights_sha256, r.failures)
                for r in lg.steps(run.run_id)], [r.timings for r in lg.steps(run.run_id)]
    finally:
        lg.close()


def start_worker_process(ledger, threads=1):
    import re
    import subprocess
    w = _qes(["worker", "--on", "socket://127.0.0.1:0", "--ledger", str(ledger), "--threads", str(threads),
              "--once"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    line = w.stderr.readline()
    m = re.search(r"listening on (socket://\S+)", line)
    assert m, line
    return w, m.group(1)


@pytest.mark.slow
def test_two_processes_give_the_one_process_ledger(tmp_path, tiny_choice_data):
    import subprocess
    data = tiny_choice_data / "bigger.jsonl"
    train = ["train", "--task", "choice", "--data", str(data), "--population", "4", "--batch", "2", "--n-ctx", "128",
             "--threads", "1", "--steps", "4"]
    one = _qes([*train, "--ledger", str(tmp_path / "one.qes")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = one.communicate(timeout=600)
    assert one.returncode == 0, err[-2000:]
    w, url = start_worker_process(tmp_path / "worker.qes")
    try:
        two = _qes([*train, "--ledger", str(tmp_path / "two.qes"), "--peers", url], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
        out, err = two.communicate(timeout=600)
        assert two.returncode == 0, err[-2000:]
        _, werr = w.communicate(timeout=60)
        assert w.returncode == 0, werr[-2000:]
    finally:
        if w.poll() is None:
            w.kill()
    want, _ = _steps(tmp_path / "one.qes")
    got, timings = _steps(tmp_path / "two.qes")
    assert len(got) == 4 and got == want
    assert [t["remote_members"] for t in timings] == [2, 2, 2, 2], (timings, err[-2000:])
    held, _ = _steps(tmp_path / "worker.qes")  # the worker held steps 0..2 to evaluate step 3
    assert held == got[:3]


@pytest.mark.slow
def test_a_queued_job_shares_its_population_through_the_daemon(tmp_path, tiny_choice_data, qes_edge_home):
    """`queue add … --peers URL,URL`: the daemon opens the links when the job starts; a worker that
    cannot be reached is left out and logged, and the ledger is still the one-process ledger."""
    import socket
    import subprocess
    data = tiny_choice_data / "bigger.jsonl"
    train = ["--task", "choice", "--data", str(data), "--population", "4", "--batch", "2", "--n-ctx", "128",
             "--threads", "1", "--steps", "3"]
    one = _qes(["train", *train, "--ledger", str(tmp_path / "one.qes")], stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err[-2000:]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"socket://127.0.0.1:{s.getsockname()[1]}"
    w, url = start_worker_process(tmp_path / "worker.qes")
    try:
        q = _qes(["queue", "add", *train, "--ledger", str(tmp_path / "daemon.qes"), "--peers", f"{url},{dead}"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = q.communicate(timeout=120)
        assert q.returncode == 0, err
        d = _qes(["daemon", "run", "--exit-when-empty", "--poll", "0.2", "--run-on-battery"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, derr = d.communicate(timeout=600)
        assert d.returncode == 0, derr[-3000:]
        w.communicate(timeout=60)
    finally:
        if w.poll() is None:
            w.kill()
    want, _ = _steps(tmp_path / "one.qes")
    got, timings = _steps(tmp_path / "daemon.qes")
    assert got == want
    assert [t["remote_members"] for t in timings] == [2, 2, 2], derr[-3000:]
    assert f"worker {dead} cannot be reached" in derr and "its members are evaluated here" in derr


def test_a_worker_refuses_what_a_sync_would_refuse(tmp_path):
    """The worker's handshake makes sync's checks (sync.session.compare): a run recorded with
    another noise spec is refused, naming it, and the worker's ledger is not touched."""
    a, b = socket_pair()
    _, th, out = start_worker(tmp_path, "w0", b)
    cfg = TrainConfig(**CFG)
    lg = Ledger(tmp_path / "two.qes")
    run = lg.create_run("00" * 32, "toy.gguf", cfg.record(), 99)
    tr = Trainer(ToyDriver(0), ToyTask(), lg, run, cfg)
    ex = PeerExecutor(tr.executor, [a], timeout=30.0, say=lambda m: None)
    ex.bind(lg, run.run_id)
    th.join(30)
    assert not ex.peers[0].alive
    assert "the worker refuses" in ex.peers[0].why and "recorded with noise spec v99" in ex.peers[0].why
    assert out["why"].startswith("refused: the worker refuses: run ")
    assert not (tmp_path / "w0.qes").exists()


def test_a_worker_placed_otherwise_than_the_coordinator_is_refused_at_the_handshake(tmp_path):
    """--gpu-layers decides the rewards' last bits: a worker that offloads differently from its
    coordinator is refused before its ledger is touched, and the run goes on without it."""
    lg1, run1 = run_local(tmp_path, 2)
    a, b = socket_pair()

    def on_gpu(info):
        raise AssertionError("a worker refused at the handshake never opens the run")
    on_gpu.gpu_layers = -1  # the worker runs --gpu-layers all; the toy coordinator places nothing
    w, th, out = start_worker(tmp_path, "w0", b, opener=on_gpu)
    tr, lg2, run2, ex, said = coordinator(tmp_path, [a])
    assert not ex.peers[0].alive
    assert "coordinator runs --gpu-layers 0, this worker --gpu-layers all" in ex.peers[0].why
    th.join(10)
    assert out["why"].startswith("refused: the worker refuses: the coordinator runs --gpu-layers 0")
    assert not (tmp_path / "w0.qes").exists()
    for _ in range(2):
        tr.step()
    assert rows(lg2, run2) == rows(lg1, run1)


def test_hello_carries_the_placement_and_reads_an_older_peer_s_as_unsaid():
    h = M.Hello(M.PROTOCOL, "0.1", "ab" * 8, "client", 1, None, 0, None, gpu_layers=12)
    assert M.decode_hello(M.encode_json(h.to_json())).gpu_layers == 12
    old = h.to_json()
    del old["gpu_layers"]  # a qes-edge from before placement was said
    assert M.decode_hello(M.encode_json(old)).gpu_layers is None
    with pytest.raises(M.MessageError, match="gpu_layers"):
        M.decode_hello(M.encode_json({**h.to_json(), "gpu_layers": "all"}))


class PartsTask(ToyTask):
    """The toy reward as two named parts (as several --reward give): `last_parts` after each batch."""

    def rewards(self, model, batch):
        r = super().rewards(model, batch)
        self.last_parts = {"m:close": float(r.mean()), "m:const": 1.0}
        return r


def test_each_reward_s_part_comes_back_from_a_worker_and_is_recorded_for_every_member(tmp_path):
    a, b = socket_pair()
    start_worker(tmp_path, "w0", b, opener=lambda info: (ToyDriver(0), PartsTask(), 0))
    cfg = TrainConfig(**CFG)
    lg = Ledger(tmp_path / "two.qes")
    run = lg.create_run("00" * 32, "toy.gguf", cfg.record(), 1)
    tr = Trainer(ToyDriver(0), PartsTask(), lg, run, cfg)
    ex = PeerExecutor(tr.executor, [a], timeout=30.0)
    ex.bind(lg, run.run_id)
    tr.executor = ex
    rec = tr.step()
    assert rec.timings["remote_members"] > 0
    parts = rec.timings["reward_parts"]
    assert parts["m:const"] == [1.0] * CFG["population"]  # the worker's members' parts too
    assert parts["m:close"] == pytest.approx(rec.rewards.tolist())


def test_rewards_messages_carry_parts_and_refuse_bad_ones():
    r = M.Rewards(1, 0, [0, 1], [0.5, math.nan], ["member 1 (seed 3): x"], {"eval_s": 0.1}, 0, "ab" * 32,
                  parts=[{"m:f": 0.5}, None])
    assert M.decode_rewards(M.rewards(r)).parts == [{"m:f": 0.5}, None]
    assert M.decode_rewards(M.rewards(M.Rewards(1, 0, [0], [0.5], [], {}, 0, "ab" * 32))).parts is None
    obj = json.loads(M.rewards(r))
    for bad in ([{"m:f": "x"}, None], [{"m:f": 1.0}], "no"):
        with pytest.raises(M.MessageError, match="parts"):
            M.decode_rewards(M.encode_json({**obj, "parts": bad}))
