"""The SQLite ledger: round trips, the hash chain, durability settings, foreign files."""

import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import fill_disk
from qes_edge.ledger.store import Ledger, LedgerError, StepRecord

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
    names = [n for (n,) in ledger.db.execute("select name from _migrations order by rowid")]
    assert names == ["0001_initial", "0002_evals", "0003_heads", "0004_members"]


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


# -- the head: a ledger whose end is known ------------------------------------------------

def _run_with_steps(path, n, seed=0):
    lg = Ledger(path)
    run = lg.create_run(SHA, "m.gguf", {"sigma": 0.01}, 1)
    rng = np.random.default_rng(seed)
    for i in range(n):
        lg.append_step(run.run_id, record(i, rng))
    return lg, run


def test_a_lost_tail_is_detected_and_named(tmp_path):
    lg, run = _run_with_steps(tmp_path / "t.qes", 5)
    head = lg.head(run.run_id)
    assert head == (5, lg.last_step(run.run_id).hash) and lg.head_hash(run.run_id) == head[1]
    lg.close()
    with sqlite3.connect(tmp_path / "t.qes") as c:
        c.execute("delete from steps where step >= 3")
    # refused as it is opened for writing (checked read-only first: the file stays as it was)
    before = (tmp_path / "t.qes").read_bytes()
    with pytest.raises(LedgerError, match=r"ends at step 2 but its head records 5 steps.*last 2 step\(s\) were lost"):
        Ledger(tmp_path / "t.qes")
    assert (tmp_path / "t.qes").read_bytes() == before
    # read-only readers see the same
    ro = Ledger(tmp_path / "t.qes", readonly=True)
    with pytest.raises(LedgerError, match="were lost"):
        ro.verify(run.run_id)


def test_a_head_that_does_not_match_is_refused(tmp_path):
    lg, run = _run_with_steps(tmp_path / "h.qes", 3)
    lg.close()
    with sqlite3.connect(tmp_path / "h.qes") as c:
        c.execute("update heads set head_hash = ?", ["00" * 32])
    with pytest.raises(LedgerError, match="do not match the recorded head"):
        Ledger(tmp_path / "h.qes").verify(run.run_id)
    with sqlite3.connect(tmp_path / "h.qes") as c:
        c.execute("delete from heads")
    with pytest.raises(LedgerError, match="head record is missing"):
        Ledger(tmp_path / "h.qes").verify(run.run_id)


def test_old_ledgers_get_their_head_from_their_steps(tmp_path):
    """A ledger written before heads existed: migrating it records the steps it holds."""
    lg, run = _run_with_steps(tmp_path / "old.qes", 4)
    lg.close()
    with sqlite3.connect(tmp_path / "old.qes") as c:
        c.execute("drop table heads")
        c.execute("delete from _migrations where name = '0003_heads'")
    ro = Ledger(tmp_path / "old.qes", readonly=True)  # read-only: no migration, no head
    assert ro.head(run.run_id) is None and ro.verify(run.run_id) == 4
    ro.close()
    lg = Ledger(tmp_path / "old.qes")
    assert lg.head(run.run_id)[0] == 4 and lg.verify(run.run_id) == 4


# -- rows that cannot be decoded --------------------------------------------------------

@pytest.mark.parametrize("sql, args, what", [
    ("update steps set seeds = NULL where step = 1", [], r"step 1 cannot be decoded: seeds is NULL"),
    ("update steps set threshold = 'x' where step = 1", [], r"step 1 cannot be decoded: threshold 'x'"),
    ("update steps set threshold = 1.5 where step = 1", [], r"step 1 cannot be decoded: threshold 1.5"),
    ("update steps set coefs_q16 = ? where step = 1", [b"\0" * 5], r"step 1 cannot be decoded: coefs_q16"),
    ("update steps set rewards = ? where step = 1", [b"\0" * 8], r"step 1 cannot be decoded: 6 seeds, 6 coefficients and 1 rewards"),
    ("update steps set timings = 'nope' where step = 1", [], r"step 1 cannot be decoded: timings"),
    ("update steps set weights_sha256 = NULL where step = 1", [], r"step 1 cannot be decoded: weights_sha256"),
])
def test_undecodable_rows_are_named(tmp_path, sql, args, what):
    lg, run = _run_with_steps(tmp_path / "d.qes", 3)
    with sqlite3.connect(tmp_path / "d.qes") as c:
        c.execute(sql, args)
    with pytest.raises(LedgerError, match=what):
        lg.verify(run.run_id)
    with pytest.raises(LedgerError, match=what):
        list(lg.steps(run.run_id))


# -- durability: the .qes file alone is the ledger --------------------------------------

def test_each_step_is_checkpointed_into_the_main_file(tmp_path):
    import shutil
    lg, run = _run_with_steps(tmp_path / "c.qes", 3)
    # while the ledger is open, copy only the .qes (as a user or a sync would)
    shutil.copyfile(tmp_path / "c.qes", tmp_path / "copy.qes")
    assert (tmp_path / "c.qes").stat().st_size > 4096
    copy = Ledger(tmp_path / "copy.qes", readonly=True)
    assert copy.verify(run.run_id) == 3 and copy.head(run.run_id)[0] == 3
    copy.close()
    lg.close()


def test_deleting_the_wal_loses_nothing(tmp_path):
    lg, run = _run_with_steps(tmp_path / "w.qes", 2)
    wal = tmp_path / "w.qes-wal"
    if wal.exists():
        wal.unlink()  # lost -wal while the process still runs (then a kill -9)
    lg2 = Ledger(tmp_path / "w.qes")
    assert lg2.verify(run.run_id) == 2 and [r.run_id for r in lg2.runs()] == [run.run_id]


def test_read_only_open_never_writes(tmp_path):
    empty = tmp_path / "empty.qes"
    empty.write_bytes(b"")
    with pytest.raises(LedgerError, match="not a qes-edge ledger"):
        Ledger(empty, readonly=True)
    assert empty.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["empty.qes"]
    with pytest.raises(LedgerError, match="ledger not found"):
        Ledger(tmp_path / "missing.qes", readonly=True)
    assert not (tmp_path / "missing.qes").exists()
    lg, run = _run_with_steps(tmp_path / "r.qes", 1)
    lg.close()
    before = (tmp_path / "r.qes").read_bytes()
    ro = Ledger(tmp_path / "r.qes", readonly=True)
    with pytest.raises(LedgerError, match="read-only"):
        ro.append_step(run.run_id, record(1, np.random.default_rng(5)))
    ro.close()
    assert (tmp_path / "r.qes").read_bytes() == before


def test_an_empty_run_can_be_removed_but_not_one_with_steps(tmp_path):
    lg = Ledger(tmp_path / "e.qes")
    run = lg.create_run(SHA, "m.gguf", {}, 1)
    lg.delete_run(run.run_id)
    assert lg.runs() == []
    run = lg.create_run(SHA, "m.gguf", {}, 1)
    lg.append_step(run.run_id, record(0, np.random.default_rng(0)))
    with pytest.raises(LedgerError, match="has recorded steps"):
        lg.delete_run(run.run_id)


def test_full_disk_during_a_step_write_is_a_clean_error_and_loses_nothing(small_disk):
    lg, run = _run_with_steps(small_disk / "full.qes", 3)
    filler = fill_disk(small_disk)
    rng = np.random.default_rng(9)
    big = StepRecord(step=3, threshold=1, seeds=np.arange(1, 20001), coefs_q16=np.zeros(20000, np.int32),
                     rewards=rng.random(20000), weights_sha256="ef" * 32)
    with pytest.raises(LedgerError, match=r"cannot record step 3 \(.*full.*\); the ledger keeps every step"):
        lg.append_step(run.run_id, big)
    lg.close()
    filler.unlink()
    lg = Ledger(small_disk / "full.qes")
    assert lg.verify(run.run_id) == 3
    lg.append_step(run.run_id, record(3, rng))  # and it goes on once there is room
    assert lg.verify(run.run_id) == 4
    lg.close()


def test_a_wal_that_continues_the_file_is_read_and_folded_in(tmp_path):
    """What a crash between a commit and its checkpoint leaves (a -wal holding the last steps,
    copied here without its -shm): readers see every step and leave no -shm behind; a writer
    folds the -wal into the file."""
    import shutil
    lg, run = _run_with_steps(tmp_path / "a.qes", 2)
    lg.checkpoint = lambda: None  # the next commits stay in the -wal, as when killed before it
    rng = np.random.default_rng(5)
    for i in range(2, 5):
        lg.append_step(run.run_id, record(i, rng))
    crash = tmp_path / "crash"
    crash.mkdir()
    shutil.copyfile(tmp_path / "a.qes", crash / "a.qes")
    shutil.copyfile(tmp_path / "a.qes-wal", crash / "a.qes-wal")
    lg.close()
    before = {p.name: p.read_bytes() for p in crash.iterdir()}
    alone = Ledger(crash / "a.qes", readonly=True, ignore_wal=True)
    assert alone.verify(run.run_id) == 2  # the file alone: the steps checkpointed
    alone.close()
    ro = Ledger(crash / "a.qes", readonly=True)
    assert ro.verify(run.run_id) == 5
    ro.close()
    assert {p.name: p.read_bytes() for p in crash.iterdir()} == before  # no -shm, nothing applied
    rw = Ledger(crash / "a.qes")
    assert rw.verify(run.run_id) == 5
    rw.close()
    assert not (crash / "a.qes-wal").exists()
    assert Ledger(crash / "a.qes", readonly=True).verify(run.run_id) == 5


def test_a_stale_wal_is_refused_and_moving_it_aside_is_the_way_out(tmp_path):
    import shutil
    lg, run = _run_with_steps(tmp_path / "b.qes", 1)
    lg.checkpoint = lambda: None
    lg.append_step(run.run_id, record(1, np.random.default_rng(7)))
    old = (tmp_path / "b.qes-wal").read_bytes()  # the writes of step 1
    lg.append_step(run.run_id, record(2, np.random.default_rng(8)))
    lg.close()
    # a -wal holding an earlier moment of the run, copied beside the file
    (tmp_path / "b.qes-wal").write_bytes(old)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for ro in (True, False):
        with pytest.raises(LedgerError, match=r"does not continue the ledger: the file alone holds 3 verified steps"):
            Ledger(tmp_path / "b.qes", readonly=ro)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    shutil.move(tmp_path / "b.qes-wal", tmp_path / "b.qes-wal.stale")
    assert Ledger(tmp_path / "b.qes").verify(run.run_id) == 3
