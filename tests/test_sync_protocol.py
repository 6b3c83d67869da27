"""Ledger sync between two endpoints: socket pairs, loopback TCP and a pseudo-terminal opened
with pyserial, with faults injected on the wire (dropped and flipped bytes, garbage, duplicated,
reordered, truncated and dropped frames, a slow peer, a cable pulled mid-frame), peers that must
be refused (another base model, noise spec, protocol, run; a looped-back line) and forks.  The
end state is always checked row for row: nothing lost, nothing corrupted, on either side."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from qes_edge.ledger.store import Ledger
from qes_edge.sync import ForkError, Incomplete, Listener, Options, PeerError, Refused, serve, serve_session, sync
from qes_edge.sync.testing import FaultyLink, extend, pty_pair, socket_pair, synthetic_ledger

COLS = "run_id, step, threshold, seeds, coefs_q16, rewards, failures, timings, weights_sha256, prev_hash, hash, created"


def opts(**kw) -> Options:
    base = dict(timeout=0.3, retries=8, engine_noise_spec=1, software="test")
    base.update(kw)
    return Options(**base)


def rows(path: Path):
    lg = Ledger(path, readonly=True)
    try:
        runs = lg.db.execute("select run_id, base_sha256, base_name, config, noise_spec, hash, created from runs "
                             "order by run_id").fetchall()
        return runs, lg.db.execute(f"select {COLS} from steps order by run_id, step").fetchall(), \
            lg.db.execute("select * from members order by run_id, step, member").fetchall()
    finally:
        lg.close()


def verified(path: Path) -> tuple[int, str]:
    lg = Ledger(path, readonly=True)
    try:
        run = lg.run()
        return lg.verify(run.run_id), lg.head_hash(run.run_id)
    finally:
        lg.close()


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def run_pair(client: Path, server: Path, links=socket_pair, client_wrap=None, server_wrap=None,
             client_opts=None, server_opts=None, client_run=None, server_run=None):
    """One session: the server in a thread, the client here.  Returns (client result or the
    exception it raised, server result)."""
    a, b = links()
    a = server_wrap(a) if server_wrap else a
    b = client_wrap(b) if client_wrap else b
    out = {}

    def srv():
        try:
            out["server"] = serve_session(a, server, server_run, server_opts or opts())[0]
        except Exception as e:  # pragma: no cover - shows up as a failed assertion below
            out["server"] = e
        finally:
            a.close()

    t = threading.Thread(target=srv, daemon=True)
    t.start()
    try:
        res = sync(lambda: b, client, client_run, client_opts or opts())
    except Exception as e:
        res = e
    finally:
        b.close()
    t.join(60)
    assert not t.is_alive(), "the server did not end"
    return res, out["server"]


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "jetson.qes"
    synthetic_ledger(path, 40)
    return path


# -- the ordinary cases ------------------------------------------------------------------------

def test_pull_into_a_new_ledger_is_row_for_row_identical(src, tmp_path):
    dst = tmp_path / "laptop.qes"
    res, srv = run_pair(dst, src)
    assert res.action == "received" and (res.first, res.last, res.steps) == (0, 39, 40), res
    assert srv.action == "sent" and srv.steps == 40
    assert rows(dst) == rows(src)  # same run row (id, config, hash, created), steps, members
    assert verified(dst) == verified(src) and res.head == verified(src)[1]
    assert "received steps 0..39 (40 steps" in res.line() and res.head in res.line()


def test_sync_is_idempotent_and_resumes_from_the_head(src, tmp_path):
    dst = tmp_path / "laptop.qes"
    lg = Ledger(src)
    run_id = lg.run().run_id
    lg.close()
    res, _ = run_pair(dst, src)
    assert res.steps == 40
    before = (sha(src), sha(dst))
    res, srv = run_pair(dst, src)
    assert res.action == "up to date" and srv.action == "up to date" and res.steps == 0
    assert (sha(src), sha(dst)) == before, "an up-to-date sync wrote something"
    # the source trains on: only the new steps cross
    lg = Ledger(src)
    extend(lg, run_id, 7)
    lg.close()
    res, _ = run_pair(dst, src)
    assert (res.first, res.last) == (40, 46) and rows(dst) == rows(src)


def test_push_when_the_client_is_ahead(src, tmp_path):
    dst = tmp_path / "follower.qes"
    res, srv = run_pair(src, dst)  # the client holds the run, the server nothing (its ledger is created)
    assert res.action == "sent" and res.steps == 40 and res.peer_n_steps == 40
    assert srv.action == "received" and (srv.first, srv.last) == (0, 39)
    assert rows(dst) == rows(src)


def test_loopback_tcp_through_pyserial_urls(src, tmp_path):
    dst = tmp_path / "laptop.qes"
    listener = Listener("socket://127.0.0.1:0")
    stop = threading.Event()
    sessions = []
    t = threading.Thread(target=serve, args=(listener, src, None, opts()),
                         kwargs=dict(on_session=sessions.append, stop=stop.is_set), daemon=True)
    t.start()
    try:
        res = sync(listener.url, dst, None, opts())
        assert res.action == "received" and res.steps == 40 and res.peer == listener.url
        res = sync(listener.url, dst, None, opts())
        assert res.action == "up to date"
    finally:
        stop.set()
        t.join(10)
        listener.close()
    assert [s.action for s in sessions] == ["sent", "up to date"]
    assert rows(dst) == rows(src)


def test_a_pseudo_terminal_opened_with_pyserial(src, tmp_path):
    """A real tty: the server on the pty's slave through pyserial (as on /dev/ttyUSB0), the
    client on its master; then the other way round, pushing."""
    dst = tmp_path / "laptop.qes"
    res, srv = run_pair(dst, src, links=pty_pair)
    assert res.action == "received" and res.steps == 40 and rows(dst) == rows(src)
    lg = Ledger(src)
    extend(lg, lg.run().run_id, 5)
    lg.close()
    res, srv = run_pair(src, dst, links=lambda: pty_pair()[::-1])
    assert res.action == "sent" and (srv.first, srv.last) == (40, 44) and rows(dst) == rows(src)


def test_loop_url_is_refused_as_an_echo(tmp_path, src):
    with pytest.raises(Refused, match="echoes this side's own frames"):
        sync("loop://", tmp_path / "x.qes", None, opts())
    assert not (tmp_path / "x.qes").exists()


# -- faults on the wire ----------------------------------------------------------------------------

FAULTS = {
    "dropped bytes": dict(drop_byte=0.0005),
    "flipped bits": dict(flip=0.0005),
    "garbage": dict(garbage=0.0005),
    "dropped frames": dict(drop_frame=0.08),
    "duplicated frames": dict(dup_frame=0.2),
    "reordered frames": dict(reorder=0.15),
    "truncated frames": dict(truncate=0.08),
    "everything at once": dict(drop_byte=0.0002, flip=0.0002, garbage=0.0002, drop_frame=0.03, dup_frame=0.05,
                               reorder=0.05, truncate=0.03),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("direction", ["pull", "push"])
def test_faults_in_both_directions_lose_and_corrupt_nothing(src, tmp_path, fault, direction):
    dst = tmp_path / "other.qes"
    seed = [0]

    def wrap(link):
        seed[0] += 1
        return FaultyLink(link, seed[0], skip_frames=0, **FAULTS[fault])

    client, server = (dst, src) if direction == "pull" else (src, dst)
    res, srv = run_pair(client, server, client_wrap=wrap, server_wrap=wrap)
    assert not isinstance(res, Exception), res
    assert res.action == ("received" if direction == "pull" else "sent"), res
    assert rows(dst) == rows(src)
    assert verified(dst) == verified(src)


def test_a_slow_peer(src, tmp_path):
    """A peer that trickles its bytes (32 at a time with pauses): slower, but nothing is given up."""
    dst = tmp_path / "laptop.qes"
    res, srv = run_pair(dst, src, server_wrap=lambda link: FaultyLink(link, 1, chunk=32, chunk_delay=0.0005))
    assert res.action == "received" and rows(dst) == rows(src)
    # slower than the receiver's timeout between two whole frames: requests are repeated, steps
    # that come twice are ignored, and it still completes
    dst2 = tmp_path / "laptop2.qes"
    res, srv = run_pair(dst2, src, server_wrap=lambda link: FaultyLink(link, 2, delay=0.05),
                        client_opts=opts(timeout=0.2, retries=30), server_opts=opts(timeout=0.2, retries=30))
    assert res.action == "received" and rows(dst2) == rows(src)


class DroppingListener:
    """A listener whose first connections are cut after `cut` bytes from the server (a cable
    pulled out mid-frame)."""

    def __init__(self, inner: Listener, cuts: list[int]):
        self.inner, self.cuts, self.url, self.is_serial = inner, list(cuts), inner.url, False

    def accept(self, timeout=None):
        link = self.inner.accept(timeout)
        if link is not None and self.cuts:
            link = FaultyLink(link, 0, disconnect_after=self.cuts.pop(0))
        return link

    def close(self):
        self.inner.close()


def serving(src, cuts, **kw):
    listener = DroppingListener(Listener("socket://127.0.0.1:0"), cuts)
    stop = threading.Event()
    sessions = []
    t = threading.Thread(target=serve, args=(listener, src, None, opts(**kw)),
                         kwargs=dict(on_session=sessions.append, stop=stop.is_set), daemon=True)
    t.start()
    return listener, stop, t, sessions


def test_a_disconnect_mid_frame_is_resumed(src, tmp_path):
    dst = tmp_path / "laptop.qes"
    listener, stop, t, sessions = serving(src, [9000, 12345])  # two cuts, each inside a step frame
    try:
        res = sync(listener.url, dst, None, opts())
    finally:
        stop.set()
        t.join(10)
        listener.close()
    assert res.action == "received" and res.sessions == 3 and (res.first, res.last) == (0, 39)
    assert rows(dst) == rows(src)
    assert [s.action for s in sessions][-1] == "sent"


def test_a_drop_without_retries_keeps_every_step_that_came(src, tmp_path):
    dst = tmp_path / "laptop.qes"
    listener, stop, t, _ = serving(src, [15000])
    try:
        with pytest.raises(Incomplete, match=r"steps 0\.\.\d+ were received and kept; run sync again") as e:
            sync(listener.url, dst, None, opts(retries=0))
        assert e.value.exit_code == 1
        n, _ = verified(dst)  # what came verifies: at most the step in flight was lost
        assert 0 < n < 40
        _, steps, _ = rows(dst)
        assert steps == rows(src)[1][:n]
        res = sync(listener.url, dst, None, opts())  # run it again: it goes on from the head
        assert (res.first, res.last) == (n, 39) and rows(dst) == rows(src)
    finally:
        stop.set()
        t.join(10)
        listener.close()


# -- refusals: named, and nothing written on either side ---------------------------------------

def refused(client, server, match, **kw):
    before = (sha(client), sha(server))
    res, srv = run_pair(client, server, **kw)
    assert isinstance(res, (Refused, PeerError)), res
    assert res.exit_code == 2
    import re
    assert re.search(match, str(res)), str(res)
    assert srv.action == "refused" and srv.exit_code == 2
    assert (sha(client), sha(server)) == before, "a refused sync wrote something"
    return str(res), srv.error


def test_another_base_model_is_refused(src, tmp_path):
    other = tmp_path / "other.qes"
    synthetic_ledger(other, 3, base_sha256="cd" * 32, base_name="gemma-3-270m.Q4_K_M.gguf")
    mine, theirs = refused(other, src, r"the peer's base model is SmolLM2-135M-Instruct.Q4_1.gguf \(sha256 abababab")
    assert "this ledger's is gemma-3-270m.Q4_K_M.gguf (sha256 cdcdcdcd" in mine
    assert "the peer's base model is gemma-3-270m.Q4_K_M.gguf" in theirs


def test_another_noise_spec_is_refused(src, tmp_path):
    mine, theirs = refused(tmp_path / "new.qes", src, "the peer's engine implements noise spec v2.*this one v1",
                           server_opts=opts(engine_noise_spec=2))
    assert "the peer's engine implements noise spec v1" in theirs and "this one v2" in theirs
    assert not (tmp_path / "new.qes").exists()


def test_a_run_recorded_with_another_noise_spec_is_refused(tmp_path):
    old = tmp_path / "old.qes"
    synthetic_ledger(old, 2, noise_spec=0)
    refused(tmp_path / "new.qes", old, "recorded with noise spec v0")


def test_another_protocol_version_is_refused(src, tmp_path):
    refused(tmp_path / "new.qes", src, "the peer speaks sync protocol v2 .*this qes-edge speaks v1",
            server_opts=opts(protocol=2))


def test_another_run_on_the_same_base_is_refused(src, tmp_path):
    other = tmp_path / "other.qes"
    synthetic_ledger(other, 3, seed=5)
    mine, _ = refused(other, src, "the peer's run is [0-9a-f]{32} \\(40 steps\\), this ledger's is [0-9a-f]{32} "
                                  "\\(3 steps\\), on the same base model")
    assert "not merged" in mine


def test_asking_for_a_run_the_peer_does_not_hold(src, tmp_path):
    refused(tmp_path / "new.qes", src, "the peer does not hold run 0{32}", client_run="0" * 32)


def test_frames_of_another_version_are_named(tmp_path):
    """A peer whose frames are of another layout: no hello ever decodes; the client says why."""
    import struct
    import zlib
    a, b = socket_pair()
    stop = threading.Event()

    def v2_peer():
        head = struct.pack("<4sBBBBIII", b"QES\xa7", 2, 1, 0, 0, 1, 0, 2)
        frame = head + struct.pack("<I", zlib.crc32(head)) + b"{}" + b"\0" * 4
        while not stop.is_set():
            try:
                if a.read(0.05):
                    a.write(frame)
            except Exception:
                return

    t = threading.Thread(target=v2_peer, daemon=True)
    t.start()
    with pytest.raises(Refused, match="sends frames of version 2; this qes-edge speaks frame version 1"):
        sync(lambda: b, tmp_path / "x.qes", None, opts(timeout=0.1, retries=3))
    stop.set()
    t.join(5)


# -- forks: found, reported from both sides, never merged -------------------------------------

@pytest.mark.parametrize("common, mine, theirs", [(20, 5, 8), (20, 9, 2), (0, 3, 3), (39, 1, 1)])
def test_a_fork_is_reported_and_nothing_written(src, tmp_path, common, mine, theirs):
    a, b = tmp_path / "a.qes", tmp_path / "b.qes"
    # both devices hold the same first `common` steps, then each trained on its own
    lg = Ledger(src)
    run_id = lg.run().run_id
    lg.db.execute("delete from members where step >= ?", [common])
    lg.db.execute("delete from steps where step >= ?", [common])
    last = lg.db.execute("select hash from steps where step = ?", [common - 1]).fetchone()
    lg.db.execute("update heads set n_steps = ?, head_hash = ?, updated = 0.0 where run_id = ?",
                  [common, last[0] if last else lg.run().hash, run_id])
    lg.close()
    a.write_bytes(src.read_bytes())
    b.write_bytes(src.read_bytes())
    for path, n, seed in ((a, mine, 1), (b, theirs, 2)):
        lg = Ledger(path)
        extend(lg, run_id, n, seed=seed)
        lg.close()
    before = (sha(a), sha(b))
    res, srv = run_pair(a, b)
    assert isinstance(res, ForkError) and res.exit_code == 3, res
    msg = str(res)
    assert msg.startswith(f"fork at step {common}: ")
    assert f"this ledger has steps {common}..{common + mine - 1}" in msg
    assert f"the peer has steps {common}..{common + theirs - 1}" in msg and "Nothing was written" in msg
    assert srv.action == "fork" and srv.exit_code == 3
    assert f"this ledger has steps {common}..{common + theirs - 1}" in srv.error  # the server's own view
    assert (sha(a), sha(b)) == before


def test_a_run_edited_at_its_root_is_refused(src, tmp_path):
    """The same run id with another run hash: not a fork (no common root), an edited ledger."""
    import sqlite3
    other = tmp_path / "edited.qes"
    other.write_bytes(src.read_bytes())
    c = sqlite3.connect(other)
    c.execute("update runs set hash = ?", ["ee" * 32])
    c.commit()
    c.close()
    res, srv = run_pair(tmp_path / "new.qes", other)
    assert srv.action == "refused" and "the run row was edited" in srv.error
    assert isinstance(res, PeerError) and "the peer's ledger cannot be used" in str(res) and res.exit_code == 2
    assert not (tmp_path / "new.qes").exists()


def test_a_run_without_steps_is_received_too(tmp_path):
    src, dst = tmp_path / "src.qes", tmp_path / "dst.qes"
    synthetic_ledger(src, 0)
    res, srv = run_pair(dst, src)
    assert res.action == "received" and res.steps == 0 and "no step recorded yet" in res.line()
    assert rows(dst) == rows(src) and verified(dst) == verified(src)
    res, srv = run_pair(dst, src)
    assert res.action == "up to date"


# -- keeping both sides of a fork: one continues as a new run that names its parent --------------

def forked(src, tmp_path, common=20, mine=5, theirs=8):
    a, b = tmp_path / "a.qes", tmp_path / "b.qes"
    lg = Ledger(src)
    run_id = lg.run().run_id
    lg.close()
    for path in (a, b):
        path.write_bytes(src.read_bytes())
        lg = Ledger(path)
        lg.db.execute("delete from members where step >= ?", [common])
        lg.db.execute("delete from steps where step >= ?", [common])
        last = lg.db.execute("select hash from steps where step = ?", [common - 1]).fetchone()[0]
        lg.db.execute("update heads set n_steps = ?, head_hash = ? where run_id = ?", [common, last, run_id])
        extend(lg, run_id, mine if path == a else theirs, seed=1 if path == a else 2)
        lg.close()
    return a, b, run_id


def test_a_fork_is_kept_by_continuing_one_side_as_a_child_run(src, tmp_path):
    a, b, run_id = forked(src, tmp_path)
    assert isinstance(run_pair(a, b)[0], ForkError)
    lg = Ledger(b)
    child = lg.branch(run_id)
    parent_steps = list(lg.steps(run_id))
    assert child.config == {**lg.run(run_id).config, "parent": {"run_id": run_id, "steps": 28,
                                                                 "head": parent_steps[-1].hash}}
    assert lg.verify(child.run_id) == 28 and lg.run().run_id == child.run_id  # the latest: what train continues
    copied = list(lg.steps(child.run_id))
    assert all(c.hash != p.hash for c, p in zip(copied, parent_steps))
    for c, p in zip(copied, parent_steps):
        assert (c.step, c.threshold, c.failures, c.weights_sha256, c.timings) == \
            (p.step, p.threshold, p.failures, p.weights_sha256, p.timings)
        assert all(np.array_equal(getattr(c, f), getattr(p, f)) for f in ("seeds", "coefs_q16", "rewards"))
    assert lg.members(child.run_id) == lg.members(run_id)
    assert lg.step_times(child.run_id) == lg.step_times(run_id)
    lg.close()
    # the other device takes the child into a ledger of its own; its own branch stays as it was
    before = sha(a)
    res, srv = run_pair(tmp_path / "child.qes", b, client_run=child.run_id)
    assert res.action == "received" and res.steps == 28, res
    assert verified(tmp_path / "child.qes") == (28, copied[-1].hash) and sha(a) == before
    # the forked run itself is still a fork: nothing was merged
    assert isinstance(run_pair(a, b, client_run=run_id)[0], ForkError)


def test_a_branch_after_some_steps_and_its_bad_input(src, tmp_path):
    from qes_edge.ledger.store import LedgerError
    lg = Ledger(src)
    run_id = lg.run().run_id
    child = lg.branch(run_id, 3)
    assert lg.verify(child.run_id) == 3 and child.config["parent"]["steps"] == 3
    assert child.config["parent"]["head"] == lg.step_hashes(run_id, [2])[2]
    empty = lg.branch(run_id, 0)
    assert lg.verify(empty.run_id) == 0 and empty.config["parent"]["head"] == lg.run(run_id).hash
    n_runs = len(lg.runs())
    with pytest.raises(LedgerError, match="cannot branch after 41 steps \\(it has 40\\)"):
        lg.branch(run_id, 41)
    with pytest.raises(LedgerError, match="no run 'nope'"):
        lg.branch("nope")
    assert len(lg.runs()) == n_runs
    lg.close()
