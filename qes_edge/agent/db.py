"""The daemon's own SQLite file, `<home>/daemon.db`: the queue of runs, the daemon's state, and
an event log (starts, stops, pauses, resumes, errors) that `qes-edge status` reads while the
daemon writes (WAL: readers never block the writer).

The training state is not here: it is in each run's ledger.  This file says what to train next
and what happened; losing it loses the queue, never a step.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

#: job states: queued (waiting), running (started; after a crash or a stop it is resumed first),
#: done, failed (an error that running again will not fix), removed
STATES = ("queued", "running", "done", "failed", "removed")


# plain SQL (the tables sqlite-utils would create): the daemon imports nothing beyond sqlite3
def _migration_0001(db: sqlite3.Connection) -> None:
    db.execute('''CREATE TABLE "jobs" (
   "id" INTEGER PRIMARY KEY, "created" REAL, "state" TEXT, "options" TEXT, "steps" INTEGER,
   "eval_every" INTEGER, "ledger" TEXT, "model" TEXT, "task" TEXT, "run_id" TEXT, "error" TEXT,
   "started" REAL, "finished" REAL)''')
    db.execute('''CREATE TABLE "events" (
   "id" INTEGER PRIMARY KEY, "time" REAL, "job_id" INTEGER, "kind" TEXT, "message" TEXT, "data" TEXT)''')
    db.execute('CREATE INDEX "idx_events_time" ON "events" ("time")')
    db.execute('''CREATE TABLE "state" ("key" TEXT PRIMARY KEY, "value" TEXT, "updated" REAL)''')


MIGRATIONS = [("0001_initial", _migration_0001)]


@dataclass
class Job:
    id: int
    state: str
    options: dict
    steps: int
    eval_every: int
    ledger: str
    model: str
    task: str
    run_id: str | None
    error: str | None
    created: float
    started: float | None
    finished: float | None


class DaemonDB:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=full")
        conn.execute("pragma busy_timeout=10000")
        conn.row_factory = sqlite3.Row
        self.conn = conn
        if not readonly:
            self._migrate()

    def _migrate(self) -> None:
        self.conn.execute("begin immediate")
        try:
            self.conn.execute('CREATE TABLE IF NOT EXISTS "migrations" ("name" TEXT PRIMARY KEY, "applied" REAL)')
            done = {r["name"] for r in self.conn.execute("select name from migrations")}
            for name, fn in MIGRATIONS:
                if name not in done:
                    fn(self.conn)
                    self.conn.execute("insert into migrations (name, applied) values (?, ?)", [name, time.time()])
            self.conn.execute("commit")
        except BaseException:
            self.conn.execute("rollback")
            raise

    def _write(self, sql: str, args=()) -> int:
        cur = self.conn.execute(sql, args)
        return cur.lastrowid

    def _query(self, sql: str, args=()) -> list[dict]:
        return [dict(r) for r in self.conn.execute(sql, args).fetchall()]

    # -- queue -------------------------------------------------------------------------------
    def add_job(self, options: dict, steps: int, eval_every: int, ledger: str, model: str, task: str) -> int:
        return self._write("insert into jobs (created, state, options, steps, eval_every, ledger, model, task) "
                           "values (?, 'queued', ?, ?, ?, ?, ?, ?)",
                           [time.time(), json.dumps(options), steps, eval_every, ledger, model, task])

    def _job(self, row) -> Job:
        d = dict(row)
        d["options"] = json.loads(d["options"])
        return Job(**{k: d[k] for k in Job.__dataclass_fields__})

    def jobs(self, states=None) -> list[Job]:
        sql, args = "select * from jobs", []
        if states:
            sql += f" where state in ({','.join('?' * len(states))})"
            args = list(states)
        try:
            return [self._job(r) for r in self._query(sql + " order by id", args)]
        except sqlite3.OperationalError:  # no table yet: a daemon creating the file right now
            return []

    def job(self, job_id: int) -> Job | None:
        rows = list(self._query("select * from jobs where id = ?", [job_id]))
        return self._job(rows[0]) if rows else None

    def next_job(self) -> Job | None:
        """An interrupted job first (it was running when the daemon stopped or died), then the
        oldest queued one."""
        rows = list(self._query("select * from jobs where state in ('running', 'queued') "
                                  "order by state = 'queued', id limit 1"))
        return self._job(rows[0]) if rows else None

    def set_job(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"update jobs set {cols} where id = ?", [*fields.values(), job_id])

    # -- state and events ----------------------------------------------------------------
    def set_state(self, **values) -> None:
        now = time.time()
        self.conn.execute("begin immediate")
        try:
            for k, v in values.items():
                self.conn.execute("insert into state (key, value, updated) values (?, ?, ?) on conflict(key) "
                                     "do update set value = excluded.value, updated = excluded.updated",
                                     [k, json.dumps(v), now])
            self.conn.execute("commit")
        except BaseException:
            self.conn.execute("rollback")
            raise

    def state(self) -> dict:
        try:
            return {r["key"]: json.loads(r["value"]) for r in self._query("select key, value from state")}
        except sqlite3.OperationalError:  # no table yet (a daemon that never started)
            return {}

    def event(self, kind: str, message: str, job_id: int | None = None, **data) -> None:
        self._write("insert into events (time, job_id, kind, message, data) values (?, ?, ?, ?, ?)",
                    [time.time(), job_id, kind, message, json.dumps(data) if data else None])

    def events(self, kinds=None, limit: int = 50, job_id: int | None = None) -> list[dict]:
        sql, args = "select * from events where 1", []
        if kinds:
            sql += f" and kind in ({','.join('?' * len(kinds))})"
            args += list(kinds)
        if job_id is not None:
            sql += " and job_id = ?"
            args.append(job_id)
        try:
            rows = list(self._query(sql + " order by id desc limit ?", args + [limit]))
        except sqlite3.OperationalError:
            return []
        return [{**r, "data": json.loads(r["data"]) if r["data"] else {}} for r in reversed(rows)]

    def close(self) -> None:
        self.conn.close()
