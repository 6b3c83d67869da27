"""The ledger: a run's whole training state in one SQLite file.

A run is the base model (sha256) + its config + one row per step (member seeds, rewards,
quantized coefficients, timings, a hash of the trainable weights after the step).  Replaying
the rows on the base model rebuilds the trained weights bit for bit; snapshots are only caches.

Integrity: every step row carries sha256(previous hash || canonical bytes of the row); the
first step chains to the run row's hash, so editing the config or any recorded step breaks
the chain and `verify` names the first bad row.  Durability: WAL with synchronous=FULL, one
transaction per step: a step that was recorded (or shared with a peer) survives a power loss.
Schema changes are named migrations, applied in order whenever the file is opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import sqlite_utils

LEDGER_FORMAT = "qes-edge-ledger"
GENESIS = b"\0" * 32


class LedgerError(Exception):
    """A ledger that cannot be used: corrupt, foreign, or not matching the model."""


def _migration_0001_initial(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["runs"].create({
        "run_id": str, "created": float, "base_sha256": str, "base_name": str,
        "config": str, "noise_spec": int, "hash": str,
    }, pk="run_id")
    db["steps"].create({
        "run_id": str, "step": int, "threshold": int, "seeds": bytes, "coefs_q16": bytes,
        "rewards": bytes, "failures": int, "timings": str, "weights_sha256": str,
        "prev_hash": str, "hash": str, "created": float,
    }, pk=("run_id", "step"), foreign_keys=[("run_id", "runs", "run_id")])


def _migration_0002_evals(db: sqlite_utils.Database) -> None:
    # held-out evaluations: observations of a run, not training state (not hash-chained)
    db["evals"].create({"run_id": str, "step": int, "split": str, "metrics": str, "created": float},
                       pk=("run_id", "step", "split"), foreign_keys=[("run_id", "runs", "run_id")])


def _migration_0003_heads(db: sqlite_utils.Database) -> None:
    # the head of each run: how many steps it has and the last one's hash, updated in the same
    # transaction as each step, so that rows lost from the end are detected (not a defence
    # against someone who rewrites the head too).  Ledgers older than this get their head from
    # the steps they hold when they are first opened for writing.
    db["heads"].create({"run_id": str, "n_steps": int, "head_hash": str, "updated": float},
                       pk="run_id", foreign_keys=[("run_id", "runs", "run_id")])
    for run_id, run_hash in db.execute("select run_id, hash from runs").fetchall():
        row = db.execute("select step, hash from steps where run_id = ? order by step desc limit 1",
                         [run_id]).fetchone()
        n, h = (0, run_hash) if row is None else (row[0] + 1, row[1])
        db["heads"].insert({"run_id": run_id, "n_steps": n, "head_hash": h, "updated": time.time()})


MIGRATIONS = [("0001_initial", _migration_0001_initial), ("0002_evals", _migration_0002_evals),
              ("0003_heads", _migration_0003_heads)]


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _h(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return h.hexdigest()


@dataclass
class StepRecord:
    step: int
    threshold: int
    seeds: np.ndarray           # int64
    coefs_q16: np.ndarray       # int32
    rewards: np.ndarray         # float64 per member (NaN where the reward failed)
    weights_sha256: str
    timings: dict = field(default_factory=dict)
    failures: int = 0
    hash: str = ""
    prev_hash: str = ""

    def payload(self, run_id: str) -> bytes:
        """Canonical bytes of everything the row records (the hash covers all of it)."""
        return b"".join([
            run_id.encode(), struct.pack("<qIq", self.step, self.threshold, self.failures),
            np.ascontiguousarray(self.seeds, "<i8").tobytes(), np.ascontiguousarray(self.coefs_q16, "<i4").tobytes(),
            np.ascontiguousarray(self.rewards, "<f8").tobytes(), bytes.fromhex(self.weights_sha256),
            canonical_json(self.timings).encode(),
        ])


@dataclass
class Run:
    run_id: str
    base_sha256: str
    base_name: str
    config: dict
    noise_spec: int
    hash: str


class Ledger:
    """A ledger file.  readonly=True opens an existing file without writing to it (no schema,
    no migration): for the commands that only read."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise LedgerError(f"ledger not found: {self.path}")
        if not readonly and self.path.is_dir():
            raise LedgerError(f"{self.path}: is a directory, not a ledger file")
        conn = None
        try:
            if readonly:
                # No -wal beside the file: no connection has it open (a writer keeps its -wal while
                # open), so it is read as immutable and SQLite creates no -wal/-shm beside it.  With
                # a -wal (a writer at work, or one killed): an ordinary read-only connection.
                quoted = str(self.path.resolve()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
                active = Path(str(self.path) + "-wal").exists()
                uri = f"file:{quoted}?mode=ro" + ("" if active else "&immutable=1")
                conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            else:
                conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            self.db = sqlite_utils.Database(conn)
            self._check_foreign()  # before any write: a foreign file must stay as it was
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (sqlite3.DatabaseError, LedgerError) as e:
            if conn is not None:
                conn.close()
            if isinstance(e, LedgerError):
                raise
            raise LedgerError(f"{self.path}: not a usable ledger ({e})") from None

    # -- schema ------------------------------------------------------------------------
    def _check_foreign(self) -> None:
        tables = set(self.db.table_names())
        if tables and "_migrations" not in tables:
            raise LedgerError(f"{self.path}: an SQLite file, but not a qes-edge ledger (tables: {sorted(tables)})")

    def _migrate(self) -> None:
        db = self.db
        if "_migrations" not in set(db.table_names()):
            if self.readonly:
                raise LedgerError(f"{self.path}: not a qes-edge ledger (the file holds no ledger tables)")
            with self._tx():
                db["_migrations"].create({"name": str, "applied": float}, pk="name")
        done = {r["name"] for r in db["_migrations"].rows}
        unknown = done - {n for n, _ in MIGRATIONS}
        if unknown:
            raise LedgerError(f"{self.path}: written by a newer qes-edge (migrations {sorted(unknown)})")
        if self.readonly:
            if "0001_initial" not in done:
                raise LedgerError(f"{self.path}: not a qes-edge ledger (no schema)")
        else:
            for name, fn in MIGRATIONS:
                if name in done:
                    continue
                with self._tx():
                    fn(db)
                    db["_migrations"].insert({"name": name, "applied": time.time()})
            if db["meta"].count == 0:
                with self._tx():
                    db["meta"].insert({"key": "format", "value": LEDGER_FORMAT})
            self.checkpoint()
        fmt = db.execute("select value from meta where key = 'format'").fetchone()
        if not fmt or fmt[0] != LEDGER_FORMAT:
            raise LedgerError(f"{self.path}: not a qes-edge ledger")
        self.has_heads = "heads" in set(db.table_names())

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error); the
        connection is in autocommit mode otherwise, so `with conn:` would not be one."""
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.conn.in_transaction:
                self.db.conn.execute("ROLLBACK")
            raise
        else:
            self.db.conn.execute("COMMIT")

    def checkpoint(self) -> None:
        """Copy every committed transaction from the -wal into the .qes file (and fsync it),
        so that the main file alone is the whole ledger."""
        if not self.readonly:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- runs --------------------------------------------------------------------------
    def create_run(self, base_sha256: str, base_name: str, config: dict, noise_spec: int) -> Run:
        run_id = uuid.uuid4().hex
        cfg = canonical_json(config)
        h = _h(GENESIS, run_id.encode(), bytes.fromhex(base_sha256), base_name.encode(), cfg.encode(),
               struct.pack("<q", noise_spec))
        with self._writing("start a run"):
            with self._tx():
                self.db["runs"].insert({"run_id": run_id, "created": time.time(), "base_sha256": base_sha256,
                                        "base_name": base_name, "config": cfg, "noise_spec": noise_spec, "hash": h})
                self.db["heads"].insert({"run_id": run_id, "n_steps": 0, "head_hash": h, "updated": time.time()})
            self.checkpoint()
        return self.run(run_id)

    def delete_run(self, run_id: str) -> None:
        """Remove a run that has no step (a start that failed before its first step): it holds
        no training state, so the next start may begin afresh with its own options."""
        if self.db.execute("select count(*) from steps where run_id = ?", [run_id]).fetchone()[0]:
            raise LedgerError(f"run {run_id} has recorded steps: refusing to delete it")
        with self._writing("remove an empty run"):
            with self._tx():
                for table in ("evals", "heads", "runs"):
                    self.db.execute(f"delete from {table} where run_id = ?", [run_id])
            self.checkpoint()

    def _writing(self, what: str):
        return _WriteGuard(self, what)

    def run(self, run_id: str | None = None) -> Run:
        """The named run, or the only/latest one."""
        if run_id is None:
            row = self.db.execute("select run_id from runs order by created desc limit 1").fetchone()
            if not row:
                raise LedgerError(f"{self.path}: holds no run")
            run_id = row[0]
        try:
            r = self.db["runs"].get(run_id)
        except sqlite_utils.db.NotFoundError:
            raise LedgerError(f"{self.path}: no run {run_id!r}") from None
        try:
            config = json.loads(r["config"])
        except json.JSONDecodeError:
            raise LedgerError(f"{self.path}: run {run_id}: config is not JSON (edited?)") from None
        return Run(r["run_id"], r["base_sha256"], r["base_name"], config, r["noise_spec"], r["hash"])

    def runs(self) -> list[Run]:
        return [self.run(r["run_id"]) for r in self.db["runs"].rows_where(order_by="created")]

    # -- steps -------------------------------------------------------------------------
    def last_step(self, run_id: str) -> StepRecord | None:
        row = self.db.execute("select * from steps where run_id = ? order by step desc limit 1", [run_id]).fetchone()
        return self._record(row) if row else None

    def append_step(self, run_id: str, rec: StepRecord) -> StepRecord:
        """Record one step durably; its number must follow the last one."""
        run = self.run(run_id)
        with self._writing(f"record step {rec.step}"), self._tx():  # one transaction: check and insert
            last = self.last_step(run_id)
            expected = 0 if last is None else last.step + 1
            if rec.step != expected:
                raise LedgerError(f"run {run_id}: step {rec.step} recorded out of order (next is {expected})")
            rec.prev_hash = run.hash if last is None else last.hash
            rec.hash = _h(bytes.fromhex(rec.prev_hash), rec.payload(run_id))
            self.db["steps"].insert({
                "run_id": run_id, "step": rec.step, "threshold": rec.threshold,
                "seeds": np.ascontiguousarray(rec.seeds, "<i8").tobytes(),
                "coefs_q16": np.ascontiguousarray(rec.coefs_q16, "<i4").tobytes(),
                "rewards": np.ascontiguousarray(rec.rewards, "<f8").tobytes(), "failures": rec.failures,
                "timings": canonical_json(rec.timings), "weights_sha256": rec.weights_sha256,
                "prev_hash": rec.prev_hash, "hash": rec.hash, "created": time.time(),
            })
            self.db["heads"].upsert({"run_id": run_id, "n_steps": rec.step + 1, "head_hash": rec.hash,
                                     "updated": time.time()}, pk="run_id")
        with self._writing(f"record step {rec.step}"):
            self.checkpoint()
        return rec

    def _record(self, row) -> StepRecord:
        cols = [d[0] for d in self.db.execute("select * from steps limit 0").description]
        r = dict(zip(cols, row))
        where = f"run {r.get('run_id')}: step {r.get('step')} cannot be decoded"
        step, threshold, failures = r["step"], r["threshold"], r["failures"]
        if type(step) is not int or step < 0:
            raise LedgerError(f"{where}: step number {step!r}")
        if type(threshold) is not int or not 0 < threshold < 2**32:
            raise LedgerError(f"{where}: threshold {threshold!r} is not an integer in (0, 2^32)")
        if type(failures) is not int or failures < 0:
            raise LedgerError(f"{where}: failures {failures!r}")
        blobs = {}
        for name, size in (("seeds", 8), ("coefs_q16", 4), ("rewards", 8)):
            v = r[name]
            if not isinstance(v, bytes) or len(v) % size:
                raise LedgerError(f"{where}: {name} is {type(v).__name__ if v is not None else 'NULL'}, "
                                  f"not a blob of {size}-byte values")
            blobs[name] = v
        n = len(blobs["seeds"]) // 8
        if n == 0 or len(blobs["coefs_q16"]) != 4 * n or len(blobs["rewards"]) != 8 * n:
            raise LedgerError(f"{where}: {n} seeds, {len(blobs['coefs_q16']) // 4} coefficients and "
                              f"{len(blobs['rewards']) // 8} rewards")
        for name in ("weights_sha256", "hash", "prev_hash"):
            v = r[name]
            if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
                raise LedgerError(f"{where}: {name} {v!r} is not a sha256 in hex")
        try:
            timings = json.loads(r["timings"])
        except (TypeError, json.JSONDecodeError):
            raise LedgerError(f"{where}: timings {r['timings']!r} are not JSON") from None
        if not isinstance(timings, dict):
            raise LedgerError(f"{where}: timings are not a JSON object")
        return StepRecord(step=step, threshold=threshold,
                          seeds=np.frombuffer(blobs["seeds"], "<i8").astype(np.int64),
                          coefs_q16=np.frombuffer(blobs["coefs_q16"], "<i4").astype(np.int32),
                          rewards=np.frombuffer(blobs["rewards"], "<f8").astype(np.float64),
                          weights_sha256=r["weights_sha256"], timings=timings,
                          failures=failures, hash=r["hash"], prev_hash=r["prev_hash"])

    def steps(self, run_id: str, start: int = 0, stop: int | None = None) -> Iterator[StepRecord]:
        sql = "select * from steps where run_id = ? and step >= ?"
        args: list = [run_id, start]
        if stop is not None:
            sql += " and step < ?"
            args.append(stop)
        for row in self.db.execute(sql + " order by step", args).fetchall():
            yield self._record(row)

    def verify(self, run_id: str) -> int:
        """Check the run row and every step's hash chain; returns the number of steps."""
        run = self.run(run_id)
        expect = _h(GENESIS, run.run_id.encode(), bytes.fromhex(run.base_sha256), run.base_name.encode(),
                    canonical_json(run.config).encode(), struct.pack("<q", run.noise_spec))
        if expect != run.hash:
            raise LedgerError(f"run {run_id}: the run row was edited (config or base model hash)")
        prev, n = run.hash, 0
        for rec in self.steps(run_id):
            if rec.step != n:
                raise LedgerError(f"run {run_id}: step {n} is missing")
            if rec.prev_hash != prev or _h(bytes.fromhex(prev), rec.payload(run_id)) != rec.hash:
                raise LedgerError(f"run {run_id}: step {rec.step} was edited or does not chain to step {rec.step - 1}")
            prev, n = rec.hash, n + 1
        head = self.head(run_id)
        if head is not None:
            want_n, want_hash = head
            if n < want_n:
                raise LedgerError(f"run {run_id}: the ledger ends at step {n - 1} but its head records {want_n} "
                                  f"steps (head {want_hash[:16]}…): the last {want_n - n} step(s) were lost")
            if n > want_n or prev != want_hash:
                raise LedgerError(f"run {run_id}: {n} steps ending in {prev[:16]}… do not match the recorded head "
                                  f"({want_n} steps, {want_hash[:16]}…): the file was edited")
        return n

    def head(self, run_id: str) -> tuple[int, str] | None:
        """(step count, head hash) as recorded with the last step; None in a ledger written
        before heads were recorded and only ever opened read-only since."""
        if not self.has_heads:
            return None
        row = self.db.execute("select n_steps, head_hash from heads where run_id = ?", [run_id]).fetchone()
        if row is None:
            raise LedgerError(f"run {run_id}: its head record is missing (the file was edited)")
        n, h = row
        if type(n) is not int or not isinstance(h, str) or len(h) != 64:
            raise LedgerError(f"run {run_id}: its head record cannot be decoded")
        return n, h

    def head_hash(self, run_id: str) -> str:
        """The hash that identifies the whole run as recorded: the last step's, or the run row's."""
        last = self.last_step(run_id)
        return last.hash if last is not None else self.run(run_id).hash

    def record_eval(self, run_id: str, step: int, split: str, metrics: dict) -> None:
        with self._writing("record an evaluation"), self._tx():
            self.db["evals"].upsert({"run_id": run_id, "step": step, "split": split,
                                     "metrics": canonical_json(metrics), "created": time.time()},
                                    pk=("run_id", "step", "split"))
        with self._writing("record an evaluation"):
            self.checkpoint()

    def evals(self, run_id: str) -> list[dict]:
        rows = self.db.execute("select step, split, metrics from evals where run_id = ? order by step", [run_id])
        return [{"step": s, "split": sp, **json.loads(m)} for s, sp, m in rows.fetchall()]

    def close(self) -> None:
        self.db.conn.close()


class _WriteGuard:
    """Turns a failed write (disk full, read-only file, I/O error) into a LedgerError that says
    what could not be recorded; SQLite rolls the transaction back, so the ledger stays as it was."""

    def __init__(self, ledger: Ledger, what: str):
        self.ledger, self.what = ledger, what

    def __enter__(self):
        if self.ledger.readonly:
            raise LedgerError(f"{self.ledger.path}: opened read-only, cannot {self.what}")
        return self

    def __exit__(self, etype, e, tb):
        if etype is not None and issubclass(etype, (sqlite3.OperationalError, sqlite3.DatabaseError, OSError)) \
                and not issubclass(etype, sqlite3.IntegrityError):
            reason = str(e)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                reason = os.strerror(errno.ENOSPC)
            raise LedgerError(f"{self.ledger.path}: cannot {self.what} ({reason}); "
                              "the ledger keeps every step recorded before it") from None
        return False
