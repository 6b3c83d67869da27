"""The SQLite ledger: round trips, the hash chain, durability settings, foreign files."""

import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qes_edge.ledger import Ledger, LedgerError, StepRecord

SHA = "ab" * 32


def record(step, rng, n=6):
    base = rng.integers(1, 2**31 - 1, n // 2)
    return StepRecord(step=step, threshold=34268880, seeds=np.stack([base, -base], 1).reshape(-1),
                      coefs_q16=rng.integers(-2**20, 2**20, n).astype(np.int32),
                      rewards=rng.random(n), weights_sha256=f"{step:064x}", timings={"eval_s": 1.5, "update_s": 0.1})


@pytest.fixture
def ledger(tmp_path):
    lg = Ledger(tmp_path / "run.qes")
    yield lg
    lg.close()


def test_pragmas_and_migrations(ledger):
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert [r["name"] for r in ledger.db["_migrations"].rows] == ["0001_initial", "0002_evals"]


@settings(max_examples=30, deadline=None)
@given(seeds=st.lists(st.integers(-(2**31 - 1), 2**31 - 1).filter(bool), min_size=1, max_size=40),
       rewards=st.lists(st.floats(allow_nan=True, allow_infinity=False), min_size=1, max_size=40),
       threshold=st.integers(1, 2**32 - 1), cfg=st.dictionaries(st.text(max_size=8), st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8), max_size=5))
def test_everything_round_trips(tmp_path_factory, seeds, rewards, threshold, cfg):
    lg = Ledger(tmp_path_factory.mktemp("l") / "r.qes")
    run = lg.create_run(SHA, "model.gguf", cfg, 1)
    n = min(len(seeds), len(rewards))
    rec = StepRecord(0, threshold, np.array(seeds[:n]), np.arange(n, dtype=np.int32) - 3,
                     np.array(rewards[:n]), "cd" * 32, {"t": 0.25}, failures=int(np.isnan(rewards[:n]).sum()))
    lg.append_step(run.run_id, rec)
    lg.close()
    lg = Ledger(lg.path)
    assert lg.run(run.run_id).config == cfg
    back = list(lg.steps(run.run_id))[0]
    assert back.threshold == threshold and back.failures == rec.failures
    assert np.array_equal(back.seeds, rec.seeds) and np.array_equal(back.coefs_q16, rec.coefs_q16)
    assert np.array_equal(back.rewards, rec.rewards, equal_nan=True)
    assert lg.verify(run.run_id) == 1


def test_chain_detects_any_edit(ledger):
    rng = np.random.default_rng(0)
    run = ledger.create_run(SHA, "m.gguf", {"sigma": 0.01, "alpha": 0.001}, 1)
    for i in range(4):
        ledger.append_step(run.run_id, record(i, rng))
    assert ledger.verify(run.run_id) == 4
    edits = [
        ("update steps set rewards = ? where step = 2", [np.ones(6).tobytes()]),
        ("update steps set coefs_q16 = ? where step = 1", [np.zeros(6, "<i4").tobytes()]),
        ("update steps set weights_sha256 = ? where step = 3", ["00" * 32]),
        ("update runs set config = ?", ['{"alpha":0.1,"sigma":0.01}']),
        ("delete from steps where step = 1", []),
    ]
    for sql, args in edits:
        with sqlite3.connect(ledger.path) as c:
            saved = c.execute("select * from steps").fetchall(), c.execute("select * from runs").fetchall()
            c.execute(sql, args)
        with pytest.raises(LedgerError, match="edited|missing"):
            ledger.verify(run.run_id)
        with sqlite3.connect(ledger.path) as c:  # put it back
            c.execute("delete from steps")
            c.execute("delete from runs")
            c.executemany(f"insert into runs values ({','.join('?' * len(saved[1][0]))})", saved[1])
            c.executemany(f"insert into steps values ({','.join('?' * len(saved[0][0]))})", saved[0])
        assert ledger.verify(run.run_id) == 4


def test_steps_in_order_only(ledger):
    rng = np.random.default_rng(1)
    run = ledger.create_run(SHA, "m.gguf", {}, 1)
    ledger.append_step(run.run_id, record(0, rng))
    with pytest.raises(LedgerError, match="out of order"):
        ledger.append_step(run.run_id, record(2, rng))
    with pytest.raises(Exception):
        ledger.append_step(run.run_id, record(0, rng))


def test_foreign_and_corrupt_files(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("create table t (x)")
    with pytest.raises(LedgerError, match="not a qes-edge ledger"):
        Ledger(other)
    junk = tmp_path / "junk.qes"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a usable ledger"):
        Ledger(junk)
    lg = Ledger(tmp_path / "x.qes")
    with pytest.raises(LedgerError, match="holds no run"):
        lg.run()
