"""The ledger's SQLite schema: its tables, the named migrations applied in order whenever a file is
opened (docs/ledger-spec.md §1), and the statements that write rows."""

from __future__ import annotations

import sqlite3
import time

import numpy as np

#: what the meta table's 'format' row says: an SQLite file of ours
LEDGER_FORMAT = "qes-edge-ledger"

#: the tables a ledger's migrations create: the training state, and what is derived from it
#: (members from the steps' blobs, heads from the last step) or only observed (evals), which a
#: ledger opened for writing gets back when they were dropped
CORE_TABLES = ("meta", "runs", "steps")


# The schema is plain SQL (the tables sqlite-utils would create, quoted the same way), so that a
# ledger is readable by any SQLite tool and opening one imports nothing beyond sqlite3.
def migration_0001_initial(db: sqlite3.Connection) -> None:
    db.execute('''CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT)''')
    db.execute('''CREATE TABLE "runs" (
   "run_id" TEXT PRIMARY KEY, "created" REAL, "base_sha256" TEXT, "base_name" TEXT,
   "config" TEXT, "noise_spec" INTEGER, "hash" TEXT)''')
    db.execute('''CREATE TABLE "steps" (
   "run_id" TEXT REFERENCES "runs"("run_id"), "step" INTEGER, "threshold" INTEGER,
   "seeds" BLOB, "coefs_q16" BLOB, "rewards" BLOB, "failures" INTEGER, "timings" TEXT,
   "weights_sha256" TEXT, "prev_hash" TEXT, "hash" TEXT, "created" REAL,
   PRIMARY KEY ("run_id", "step"))''')


def migration_0002_evals(db: sqlite3.Connection) -> None:
    # held-out evaluations: observations of a run, not training state (not hash-chained)
    db.execute('''CREATE TABLE "evals" (
   "run_id" TEXT REFERENCES "runs"("run_id"), "step" INTEGER, "split" TEXT, "metrics" TEXT,
   "created" REAL, PRIMARY KEY ("run_id", "step", "split"))''')


def migration_0003_heads(db: sqlite3.Connection) -> None:
    # the head of each run: how many steps it has and the last one's hash, updated in the same
    # transaction as each step, so that rows lost from the end are detected (not a defence
    # against someone who rewrites the head too).  Ledgers older than this get their head from
    # the steps they hold when they are first opened for writing.
    db.execute('''CREATE TABLE "heads" (
   "run_id" TEXT PRIMARY KEY REFERENCES "runs"("run_id"), "n_steps" INTEGER, "head_hash" TEXT,
   "updated" REAL)''')
    for run_id, run_hash in db.execute("select run_id, hash from runs").fetchall():
        row = db.execute("select step, hash from steps where run_id = ? order by step desc limit 1",
                         [run_id]).fetchone()
        n, h = (0, run_hash) if row is None else (row[0] + 1, row[1])
        db.execute(UPSERT_HEAD, [run_id, n, h, time.time()])


UPSERT_HEAD = ("insert into heads (run_id, n_steps, head_hash, updated) values (?, ?, ?, ?) on conflict(run_id) "
                "do update set n_steps = excluded.n_steps, head_hash = excluded.head_hash, updated = excluded.updated")
INSERT_RUN = ("insert into runs (run_id, created, base_sha256, base_name, config, noise_spec, hash) "
               "values (?, ?, ?, ?, ?, ?, ?)")
INSERT_STEP = ("insert into steps (run_id, step, threshold, seeds, coefs_q16, rewards, failures, timings, "
                "weights_sha256, prev_hash, hash, created) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def member_rows(run_id: str, step: int, seeds: bytes, coefs_q16: bytes, rewards: bytes) -> list[tuple] | None:
    """The `members` rows of one step from its blobs (reward NULL where it is NaN); None where
    the blobs cannot be decoded (such a row is refused by every reader anyway)."""
    if not all(isinstance(b, bytes) for b in (seeds, coefs_q16, rewards)) or len(seeds) % 8:
        return None
    n = len(seeds) // 8
    if len(coefs_q16) != 4 * n or len(rewards) != 8 * n:
        return None
    s, c, r = np.frombuffer(seeds, "<i8"), np.frombuffer(coefs_q16, "<i4"), np.frombuffer(rewards, "<f8")
    return [(run_id, step, i, int(s[i]), None if np.isnan(r[i]) else float(r[i]), int(c[i])) for i in range(n)]


INSERT_MEMBERS = "insert into members (run_id, step, member, seed, reward, coef_q16) values (?, ?, ?, ?, ?, ?)"

# a step at a glance (sqlite-utils query, Datasette): the rewards from `members`, the timings from
# the step's JSON (NULL where a step did not record that key)
STEP_SUMMARY = """
create view step_summary as
select s.run_id, s.step,
       avg(m.reward) as mean_reward, min(m.reward) as min_reward, max(m.reward) as max_reward,
       s.failures,
       json_extract(s.timings, '$.changed') as changed,
       json_extract(s.timings, '$.perturb_s') as perturb_s,
       json_extract(s.timings, '$.eval_s') as eval_s,
       json_extract(s.timings, '$.restore_s') as restore_s,
       json_extract(s.timings, '$.update_s') as update_s,
       json_extract(s.timings, '$.digest_s') as digest_s,
       json_extract(s.timings, '$.rss_mb') as rss_mb,
       s.created
from steps s left join members m on m.run_id = s.run_id and m.step = s.step
group by s.run_id, s.step
"""


def migration_0004_members(db: sqlite3.Connection) -> None:
    # one row per member of each step, for SQL tools: derived from the step's blobs (which the
    # hash chain covers), written in the same transaction as the step, checked by verify.  The
    # primary key's index serves lookups by (run, step) and the foreign key's checks.
    db.execute("""
        create table members (
            run_id text not null, step integer not null, member integer not null,
            seed integer not null, reward real, coef_q16 integer not null,
            primary key (run_id, step, member),
            foreign key (run_id, step) references steps (run_id, step))""")
    for run_id, step, seeds, coefs, rewards in db.execute(
            "select run_id, step, seeds, coefs_q16, rewards from steps order by run_id, step").fetchall():
        rows = member_rows(run_id, step, seeds, coefs, rewards)
        if rows is not None:  # an undecodable step gets none: readers and verify name it
            db.executemany(INSERT_MEMBERS, rows)
    db.execute(STEP_SUMMARY)


MIGRATIONS = [("0001_initial", migration_0001_initial), ("0002_evals", migration_0002_evals),
              ("0003_heads", migration_0003_heads), ("0004_members", migration_0004_members)]
