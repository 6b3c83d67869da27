"""Migration 0004: the steps' blobs as one row per member (`members`) and a `step_summary` view,
for SQL tools; derived data, written with each step, backfilled into older ledgers, checked by
verify."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils

from qes_edge.ledger import schema as S
from qes_edge.ledger import store as L
from qes_edge.ledger.store import Ledger, LedgerError, StepRecord

SHA = "ab" * 32


def record(step, rng, n=6, nan_at=()):
    base = rng.integers(1, 2**31 - 1, n // 2)
    rewards = rng.random(n)
    rewards[list(nan_at)] = np.nan
    return StepRecord(step=step, threshold=34268880, seeds=np.stack([base, -base], 1).reshape(-1),
                      coefs_q16=rng.integers(-2**20, 2**20, n).astype(np.int32), rewards=rewards,
                      weights_sha256=f"{step + 1:064x}", failures=len(nan_at),
                      timings={"perturb_s": 0.5 + step, "eval_s": 8.25, "restore_s": 0.25, "update_s": 0.125,
                               "digest_s": 0.0625, "changed": 100 + step, **({"rss_mb": 190.5} if step % 2 else {})})


def filled(path, n_steps=5, runs=2):
    """A ledger with `runs` runs of n_steps steps (step 2 of each has a failed member) and evals."""
    lg = Ledger(path)
    rng = np.random.default_rng(7)
    ids = []
    for r in range(runs):
        run = lg.create_run(SHA, "m.gguf", {"seed": r}, 1)
        for i in range(n_steps):
            lg.append_step(run.run_id, record(i, rng, nan_at=(3,) if i == 2 else ()))
        lg.record_eval(run.run_id, n_steps, "heldout", {"accuracy": 0.5})
        ids.append(run.run_id)
    return lg, ids


def blobs(path):
    with sqlite3.connect(path) as c:
        return c.execute("select run_id, step, seeds, coefs_q16, rewards from steps order by run_id, step").fetchall()


def test_a_new_ledger_has_a_row_per_member(tmp_path):
    lg, ids = filled(tmp_path / "n.qes")
    lg.close()
    db = sqlite_utils.Database(tmp_path / "n.qes")
    assert db["members"].pks == ["run_id", "step", "member"]
    assert {fk.other_table for fk in db["members"].foreign_keys} == {"steps"}
    for run_id, step, seeds, coefs, rewards in blobs(tmp_path / "n.qes"):
        rows = list(db["members"].rows_where("run_id = ? and step = ?", [run_id, step], order_by="member"))
        s, c, r = np.frombuffer(seeds, "<i8"), np.frombuffer(coefs, "<i4"), np.frombuffer(rewards, "<f8")
        assert [x["member"] for x in rows] == list(range(len(s)))
        assert [x["seed"] for x in rows] == s.tolist() and [x["coef_q16"] for x in rows] == c.tolist()
        assert [x["reward"] for x in rows] == [None if np.isnan(v) else v for v in r.tolist()]
    assert db["members"].count == 2 * 5 * 6
    # a failed member is NULL, not a number
    assert db.execute("select count(*) from members where reward is null").fetchone()[0] == 2
    lg = Ledger(tmp_path / "n.qes")
    assert all(lg.verify(i) == 5 for i in ids)
    m = lg.members(ids[0], 2)
    assert [x["member"] for x in m] == list(range(6)) and m[3]["reward"] is None and m[3]["step"] == 2


def test_step_summary_agrees_with_numpy_on_the_blobs(tmp_path):
    lg, ids = filled(tmp_path / "v.qes")
    recs = {(i, r.step): r for i in ids for r in lg.steps(i)}
    lg.close()
    db = sqlite_utils.Database(tmp_path / "v.qes")
    rows = list(db.query("select * from step_summary"))
    assert len(rows) == len(recs)
    assert list(rows[0]) == ["run_id", "step", "mean_reward", "min_reward", "max_reward", "failures", "changed",
                             "perturb_s", "eval_s", "restore_s", "update_s", "digest_s", "rss_mb", "created"]
    for row in rows:
        rec = recs[(row["run_id"], row["step"])]
        assert row["mean_reward"] == pytest.approx(float(np.nanmean(rec.rewards)), rel=1e-12)
        assert row["min_reward"] == float(np.nanmin(rec.rewards)) and row["max_reward"] == float(np.nanmax(rec.rewards))
        assert row["failures"] == rec.failures == int(np.isnan(rec.rewards).sum())
        for k in ("changed", "perturb_s", "eval_s", "restore_s", "update_s", "digest_s", "rss_mb"):
            assert row[k] == rec.timings.get(k)


def _old_ledger(src: Path, dst: Path):
    """The ledger qes-edge wrote before 0004: migrations 0001-0003 applied by their own functions,
    then src's runs, steps, heads and evals copied over row for row."""
    db = sqlite_utils.Database(dst)
    db["_migrations"].create({"name": str, "applied": float}, pk="name")
    for name, fn in S.MIGRATIONS[:3]:
        fn(db)
        db["_migrations"].insert({"name": name, "applied": 1.0})
    db["meta"].insert({"key": "format", "value": L.LEDGER_FORMAT})
    with sqlite3.connect(src) as c:
        for table in ("runs", "steps", "heads", "evals"):
            rows = c.execute(f"select * from {table}").fetchall()
            db.conn.executemany(f"insert into {table} values ({','.join('?' * len(rows[0]))})", rows)
    db.conn.commit()
    db.conn.close()


def _content(path):
    with sqlite3.connect(path) as c:
        return {t: c.execute(f"select * from {t} order by 1, 2").fetchall()
                for t in ("runs", "steps", "heads", "evals", "members", "meta")}


def test_an_old_ledger_is_backfilled_on_its_first_writable_open(tmp_path):
    lg, ids = filled(tmp_path / "new.qes")
    lg.close()
    _old_ledger(tmp_path / "new.qes", tmp_path / "old.qes")
    db = sqlite_utils.Database(tmp_path / "old.qes")
    assert "members" not in db.table_names() and "step_summary" not in db.view_names()
    db.conn.close()
    before = (tmp_path / "old.qes").read_bytes()
    # read-only: no migration, and whatever reads members falls back to the blobs
    ro = Ledger(tmp_path / "old.qes", readonly=True)
    assert not ro.has_members and ro.verify(ids[0]) == 5
    new = Ledger(tmp_path / "new.qes", readonly=True)
    assert ro.members(ids[1]) == new.members(ids[1]) and ro.members(ids[0], 2) == new.members(ids[0], 2)
    assert len(ro.members(ids[0])) == 30
    ro.close()
    new.close()
    assert (tmp_path / "old.qes").read_bytes() == before
    # the first writable open backfills: the same content as a ledger written with 0004
    lg = Ledger(tmp_path / "old.qes")
    assert [n for (n,) in lg.db.execute("select name from _migrations order by rowid")][-1] == "0004_members"
    assert all(lg.verify(i) == 5 for i in ids)
    lg.close()
    assert _content(tmp_path / "old.qes") == _content(tmp_path / "new.qes")
    db = sqlite_utils.Database(tmp_path / "old.qes")
    assert list(db.query("select * from step_summary")) == list(
        sqlite_utils.Database(tmp_path / "new.qes").query("select * from step_summary"))
    # and it goes on: the next step gets its rows
    lg = Ledger(tmp_path / "old.qes")
    lg.append_step(ids[1], record(5, np.random.default_rng(1)))
    assert len(lg.members(ids[1], 5)) == 6 and lg.verify(ids[1]) == 6


def test_a_step_that_cannot_be_decoded_gets_no_rows_and_verify_names_it(tmp_path):
    lg, ids = filled(tmp_path / "n.qes", runs=1)
    lg.close()
    _old_ledger(tmp_path / "n.qes", tmp_path / "o.qes")
    with sqlite3.connect(tmp_path / "o.qes") as c:
        c.execute("update steps set rewards = ? where step = 1", [b"\0" * 8])
    before = (tmp_path / "o.qes").read_bytes()
    with pytest.raises(LedgerError, match="step 1 cannot be decoded"):
        Ledger(tmp_path / "o.qes")  # verified read-only before the migration writes anything
    assert (tmp_path / "o.qes").read_bytes() == before
    with pytest.raises(LedgerError, match="step 1 cannot be decoded"):
        Ledger(tmp_path / "o.qes", readonly=True).verify(ids[0])
    # the migration itself does not stop at it: that step gets no rows, the others theirs
    from qes_edge.ledger.schema import migration_0004_members as _migration_0004_members
    with sqlite3.connect(tmp_path / "o.qes") as c:
        _migration_0004_members(c)
        steps = [s for (s,) in c.execute("select step from members")]
    assert steps.count(1) == 0 and steps.count(0) > 0


@pytest.mark.parametrize("sql, what", [
    ("update members set reward = 0.125 where step = 3 and member = 2",
     r"step 3: its rows in the members table do not match the step row .* member 2: reward 0.125 \(the step row has "),
    ("update members set reward = 0.5 where step = 2 and member = 3",
     r"step 2: .*member 3: reward 0.5 \(the step row has None\)"),
    ("update members set seed = seed + 1 where step = 1 and member = 0", r"step 1: .*member 0: seed"),
    ("update members set coef_q16 = 0 where step = 4 and member = 5", r"step 4: .*member 5: coef_q16 0"),
    ("delete from members where step = 0 and member = 5", r"step 0: .*: 5 member rows for 6 members"),
    ("insert into members values ((select run_id from runs), 4, 6, 1, 0.5, 1)", r"step 4: .*: 7 member rows for 6"),
    ("insert into members values ((select run_id from runs), 9, 0, 1, 0.5, 1)",
     r"the members table has rows for step 9, which the ledger does not hold"),
])
def test_an_edited_member_row_fails_verify_naming_the_step(tmp_path, sql, what):
    lg, ids = filled(tmp_path / "t.qes", runs=1)
    lg.close()
    with sqlite3.connect(tmp_path / "t.qes") as c:  # foreign keys off: as any SQLite tool edits it
        c.execute(sql)
    for ro in (False, True):  # opened for writing, it is refused at once (verified read-only first)
        with pytest.raises(LedgerError, match=what):
            lg = Ledger(tmp_path / "t.qes", readonly=ro)
            lg.verify(ids[0])
            lg.close()


def test_the_member_rows_go_with_the_step_in_one_transaction(tmp_path):
    lg, ids = filled(tmp_path / "x.qes", n_steps=2, runs=1)
    bad = record(2, np.random.default_rng(3))
    bad.coefs_q16 = bad.coefs_q16[:4]
    with pytest.raises(LedgerError, match="step 2 has 6 seeds, 4 coefficients and 6 rewards"):
        lg.append_step(ids[0], bad)
    assert lg.verify(ids[0]) == 2 and lg.db.execute("select count(*) from members").fetchone()[0] == 12
    # a member row that cannot be written (here: taken already) rolls the step back too
    with sqlite3.connect(tmp_path / "x.qes") as c:
        c.execute("insert into members values (?, 2, 0, 1, 0.5, 1)", [ids[0]])
    with pytest.raises(sqlite3.IntegrityError):
        lg.append_step(ids[0], record(2, np.random.default_rng(3)))
    assert lg.last_step(ids[0]).step == 1 and lg.head(ids[0])[0] == 2
