"""Serving a ledger that is being trained (the daemon's `--serve`), without the model: the server
reads through a read-only connection and only sends (a push is refused, nothing written); a
server with nothing to offer yet says `unavailable` (a follower waits and asks again); a
ledger that grows between sessions is served up to its new head; a training step's time is the
sum of its recorded parts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qes_edge.ledger.store import Ledger
from qes_edge.sync import Options, serve_session, sync
from qes_edge.training.follow import train_seconds
from qes_edge.sync.session import PeerError
from qes_edge.sync.testing import extend, socket_pair, synthetic_ledger


def opts():
    return Options(timeout=0.3, retries=2, engine_noise_spec=1, software="test")


def session(client: Path, server, readonly=True):
    a, b = socket_pair()
    out = {}

    def srv():
        try:
            out["server"] = serve_session(a, server, None, opts(), readonly=readonly, hello_wait=5)[0]
        finally:
            a.close()

    t = threading.Thread(target=srv, daemon=True)
    t.start()
    try:
        res = sync(lambda: b, client, None, opts())
    except Exception as e:  # noqa: BLE001
        res = e
    finally:
        b.close()
    t.join(30)
    return res, out["server"]


def head(path: Path):
    lg = Ledger(path, readonly=True)
    try:
        return lg.head(lg.run().run_id)
    finally:
        lg.close()


def test_a_read_only_server_sends_a_growing_ledger(tmp_path):
    src, dst = tmp_path / "src.qes", tmp_path / "dst.qes"
    synthetic_ledger(src, 3)
    res, srv = session(dst, src)
    assert res.action == "received" and (res.first, res.last) == (0, 2), res
    lg = Ledger(src)
    extend(lg, lg.run().run_id, 2)  # the trainer records two more steps
    lg.close()
    res, srv = session(dst, src)
    assert (res.first, res.last) == (3, 4) and head(dst) == head(src)


def test_a_read_only_server_refuses_a_push(tmp_path):
    src, dst = tmp_path / "src.qes", tmp_path / "dst.qes"
    synthetic_ledger(src, 2)
    session(dst, src)
    lg = Ledger(dst)
    extend(lg, lg.run().run_id, 2)  # the client is ahead: it would push
    lg.close()
    before = src.read_bytes()
    res, srv = session(dst, src)
    assert isinstance(res, PeerError) and "only sends" in str(res), res
    assert srv.exit_code == 2 and src.read_bytes() == before and head(src)[0] == 2


@pytest.mark.parametrize("what", ["none", "missing", "empty", "zero-bytes", "no-tables"])
def test_nothing_to_offer_yet_is_unavailable(tmp_path, what):
    """zero-bytes and no-tables: the instants while the daemon creates its job's ledger (SQLite has
    made the file, the schema's transaction has not committed); a follower that asked then was
    refused and exited (seen once under ASAN on a loaded machine)."""
    import sqlite3
    path = tmp_path / "src.qes"
    if what == "empty":
        Ledger(path).close()  # created, no run yet
    elif what == "zero-bytes":
        path.touch()
    elif what == "no-tables":
        con = sqlite3.connect(path)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA user_version=1")
        con.commit()
        con.close()
    server = (lambda: None) if what == "none" else path
    res, srv = session(tmp_path / "dst.qes", server)
    assert isinstance(res, PeerError) and res.code == "unavailable", res
    assert not (tmp_path / "dst.qes").exists()


def test_a_served_file_with_other_tables_is_still_refused(tmp_path):
    import sqlite3
    path = tmp_path / "src.qes"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    res, srv = session(tmp_path / "dst.qes", path)
    assert isinstance(res, PeerError) and res.code != "unavailable", res


def test_training_time_is_the_sum_of_its_parts():
    t = {"perturb_s": 0.25, "eval_s": 50.0, "restore_s": 0.25, "update_s": 0.2, "digest_s": 0.3, "changed": 7,
         "rss_mb": 180.0}
    assert train_seconds(t) == pytest.approx(51.0)
    assert train_seconds({}) is None and train_seconds(None) is None and train_seconds({"changed": 1}) is None


def test_garbage_and_dropped_connections_do_not_stop_the_server(tmp_path):
    """What the daemon's serving thread runs: serve() goes on after a peer that sends garbage,
    one that hangs up mid-hello, and answers the next one."""
    import os
    import socket

    from qes_edge.sync import Listener, serve
    from qes_edge.sync import messages as M
    from qes_edge.sync.frames import encode
    src = tmp_path / "src.qes"
    synthetic_ledger(src, 3)
    listener = Listener("socket://127.0.0.1:0")
    stop = threading.Event()
    seen = []
    t = threading.Thread(target=serve, args=(listener, src, None, opts()),
                         kwargs={"stop": stop.is_set, "readonly": True, "on_session": seen.append}, daemon=True)
    t.start()
    port = int(listener.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(os.urandom(5000))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(encode(int(M.T.HELLO), b'{"protocol": 1', 7, 0)[:20])  # cut mid-frame
        res = sync(listener.url, tmp_path / "dst.qes", None, opts())
        assert (res.first, res.last) == (0, 2)
    finally:
        stop.set()
        t.join(10)
        listener.close()
    assert not t.is_alive() and head(tmp_path / "dst.qes") == head(src)
