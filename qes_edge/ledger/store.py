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
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from qes_edge import faults
from qes_edge.ledger.chain import Run, StepRecord, canonical_json, chain_hash, row_blobs, run_hash
from qes_edge.ledger.schema import (CORE_TABLES, INSERT_MEMBERS, INSERT_RUN, INSERT_STEP, LEDGER_FORMAT, MIGRATIONS,
                                    UPSERT_HEAD,
                                    member_rows, migration_0002_evals, migration_0003_heads,
                                    migration_0004_members)



class LedgerError(Exception):
    """A ledger that cannot be used: corrupt, foreign, or not matching the model."""


class _NoSchema(LedgerError):
    """An SQLite file without ledger tables (a new ledger is created in it when opened for writing)."""


def check_not_directory(path: Path) -> None:
    """LedgerError when a folder is given where a ledger file is meant: the one message for it,
    which every command that takes a ledger says."""
    if Path(path).is_dir():
        raise LedgerError(f"{path}: is a directory, not a ledger file")


def _uri(path: Path, **params) -> str:
    quoted = str(path.resolve()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return f"file:{quoted}?" + "&".join(f"{k}={v}" for k, v in params.items())


def _received_time(created) -> float:
    """A peer's time of a row when it is a plausible unix time, else now."""
    ok = isinstance(created, (int, float)) and created == created and abs(created) < 1e12
    return float(created) if ok else time.time()


class Ledger:
    """A ledger file.  readonly=True opens an existing file without writing to it (no schema,
    no migration): for the commands that only read."""

    def __init__(self, path: str | Path, readonly: bool = False, ignore_wal: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.repaired: list[str] = []  # derived tables rebuilt when the file was opened for writing
        self._copy_dir: str | None = None
        wal, shm = Path(str(self.path) + "-wal"), Path(str(self.path) + "-shm")
        # a -wal with no -shm beside it: no connection has the file open, the -wal is left over
        # (or copied with the file); when the chain breaks with it, verify says what to do
        self.wal_read = False
        check_not_directory(self.path)
        if readonly and not self.path.is_file():
            raise LedgerError(f"ledger not found: {self.path}")
        if not readonly and self.path.is_file() and self.path.stat().st_size:
            self._verified_before_writing()  # read-only: bad input leaves every file as it was
        conn = None
        try:
            if readonly:
                if ignore_wal or not wal.exists():
                    # no -wal (no connection has the file open: a writer keeps its -wal while open),
                    # or the main file alone asked for: read as immutable, no -wal/-shm created
                    uri = _uri(self.path, mode="ro", immutable=1)
                elif shm.exists():
                    # a writer at work (it keeps a -shm while open), or one killed: read through
                    # its -wal with an ordinary read-only connection, as SQLite's locking allows
                    uri = _uri(self.path, mode="ro")
                else:
                    # a -wal with no -shm: no connection has the file open (a copied or stray -wal).
                    # Read a private copy of both, so that reading neither applies the -wal to the
                    # file nor leaves a -shm beside it
                    self.wal_read = True
                    self._copy_dir = tempfile.mkdtemp(prefix="qes-ledger-")
                    copy = Path(self._copy_dir) / "ledger.qes"
                    shutil.copyfile(self.path, copy)
                    shutil.copyfile(wal, str(copy) + "-wal")
                    uri = _uri(copy, mode="ro")
                conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            else:
                conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            self.db = conn
            self._check_foreign()  # before any write: a foreign file must stay as it was
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            if self.wal_read:
                self._check_wal_continues()
        except (sqlite3.DatabaseError, LedgerError, OSError) as e:
            if conn is not None:
                conn.close()
            self._drop_copy()
            if isinstance(e, LedgerError):
                raise
            raise LedgerError(f"{self.path}: not a usable ledger ({e})") from None

    def _verified_before_writing(self) -> None:
        """Open the existing file read-only and verify every run before anything opens it for
        writing: opening for writing applies a -wal lying beside the file to it (and deletes the
        -wal) and migrates the schema, so a ledger that does not verify must be refused first."""
        try:
            ro = Ledger(self.path, readonly=True)
        except _NoSchema:
            return  # an SQLite file without ledger tables: the schema is created in it
        try:
            for run in ro.runs():
                ro.verify(run.run_id)
        except sqlite3.Error as e:
            raise LedgerError(f"{self.path}: not a usable ledger ({e})") from None
        finally:
            ro.close()

    def _drop_copy(self) -> None:
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    def _wal_move(self) -> str:
        wal = f"{self.path}-wal"
        return (f"If the -wal was copied from another state of the run, move it aside (mv '{wal}' '{wal}.stale') "
                "and run again. Nothing was changed")

    def _check_wal_continues(self) -> None:
        """A -wal left beside the file (no connection has it open) must only add to what the file
        holds: a run is append-only, so every step the file alone records is there, unchanged,
        when it is read with its -wal.  A -wal of an older or another state of the run (copied
        with the file) takes recorded steps away or changes them, and SQLite would apply it to the
        file as it was opened for writing: refused, naming what to do."""
        try:
            alone = Ledger(self.path, readonly=True, ignore_wal=True)
        except LedgerError:
            return  # the file alone is no whole ledger (a checkpoint cut short): its -wal completes it
        try:
            for run in alone.runs():
                try:
                    n = alone.verify(run.run_id)
                except LedgerError:
                    return  # the same: only the -wal makes it whole
                if n == 0:
                    continue
                want = alone.db.execute("select hash from steps where run_id = ? and step = ?",
                                        [run.run_id, n - 1]).fetchone()
                got = self.db.execute("select hash from steps where run_id = ? and step = ?",
                                      [run.run_id, n - 1]).fetchone()
                if got != want:
                    k = self.db.execute("select count(*) from steps where run_id = ?", [run.run_id]).fetchone()[0]
                    raise LedgerError(
                        f"{self.path}: the -wal file beside it does not continue the ledger: the file alone holds "
                        f"{n} verified steps of run {run.run_id[:8]}, read with the -wal it holds {k}"
                        f"{'' if k < n else ' that differ from them'}. {self._wal_move()}")
        finally:
            alone.close()

    def _wal_hint(self, run_id: str) -> str:
        """What to do about a -wal that was read with the ledger and broke its chain."""
        try:
            alone = Ledger(self.path, readonly=True, ignore_wal=True)
            try:
                without = f"without it the ledger verifies ({alone.verify(run_id)} steps)"
            finally:
                alone.close()
        except LedgerError as e:
            without = f"without it the ledger does not verify either ({e})"
        return f". A -wal file lies beside the ledger and was read with it; {without}. {self._wal_move()}"

    # -- schema ------------------------------------------------------------------------
    def _check_foreign(self) -> None:
        tables = self._tables()
        if tables and "_migrations" not in tables:
            raise LedgerError(f"{self.path}: an SQLite file, but not a qes-edge ledger (tables: {sorted(tables)})")

    def _tables(self) -> set[str]:
        return {n for (n,) in self.db.execute("select name from sqlite_master where type = 'table'").fetchall()}

    def _migrate(self) -> None:
        db = self.db
        if "_migrations" not in self._tables():
            if self.readonly:
                raise _NoSchema(f"{self.path}: not a qes-edge ledger (the file holds no ledger tables)")
            with self._tx():
                db.execute('CREATE TABLE "_migrations" ("name" TEXT PRIMARY KEY, "applied" REAL)')
        done = {n for (n,) in db.execute("select name from _migrations").fetchall()}
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
                    db.execute("insert into _migrations (name, applied) values (?, ?)", [name, time.time()])
        self._check_core_tables()
        if not self.readonly:
            self._repair_schema()
            if db.execute("select count(*) from meta").fetchone()[0] == 0:
                with self._tx():
                    db.execute("insert into meta (key, value) values ('format', ?)", [LEDGER_FORMAT])
            self.checkpoint()
        fmt = db.execute("select value from meta where key = 'format'").fetchone()
        if not fmt or fmt[0] != LEDGER_FORMAT:
            raise LedgerError(f"{self.path}: not a qes-edge ledger")
        tables = self._tables()
        self.has_heads = "heads" in tables
        self.has_members = "members" in tables  # not in a ledger before 0004 opened read-only

    def _check_core_tables(self) -> None:
        lost = [t for t in CORE_TABLES if t not in self._tables()]
        if lost:
            raise LedgerError(f"{self.path}: the ledger's {', '.join(lost)} table{'s are' if len(lost) > 1 else ' is'} "
                              "missing (the file was damaged): it cannot be rebuilt; restore the file from a copy "
                              "or fetch the run again with `qes-edge sync`")

    def _repair_schema(self) -> None:
        """A ledger whose migrations are recorded but whose tables are not all there (dropped by
        hand or by a tool): the training state missing is refused; what is derived from it
        (members, heads, the step_summary view) or only observed (evals) is rebuilt, before any
        work is done with the file."""
        tables = self._tables()
        rebuild = [(name, fn) for name, fn in (("evals", migration_0002_evals), ("heads", migration_0003_heads),
                                               ("members", migration_0004_members)) if name not in tables]
        if not rebuild:
            return
        with self._tx():
            for name, fn in rebuild:
                if name == "members":
                    self.db.execute("drop view if exists step_summary")
                fn(self.db)
        self.repaired = [name for name, _ in rebuild]

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error); the
        connection is in autocommit mode otherwise, so `with conn:` would not be one."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    def checkpoint(self) -> None:
        """Copy every committed transaction from the -wal into the .qes file (and fsync it),
        so that the main file alone is the whole ledger."""
        if not self.readonly:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- runs --------------------------------------------------------------------------
    def create_run(self, base_sha256: str, base_name: str, config: dict, noise_spec: int) -> Run:
        run_id = uuid.uuid4().hex
        cfg = canonical_json(config)
        h = run_hash(run_id, base_sha256, base_name, cfg, noise_spec)
        with self._writing("start a run"):
            with self._tx():
                self.db.execute(INSERT_RUN, [run_id, time.time(), base_sha256, base_name, cfg, noise_spec, h])
                self.db.execute(UPSERT_HEAD, [run_id, 0, h, time.time()])
            self.checkpoint()
        return self.run(run_id)

    def branch(self, run_id: str, steps: int | None = None) -> Run:
        """A new run that continues `run_id` after its first `steps` steps (all of them by default):
        the way to keep both sides of a fork.  Its config is the parent's plus `parent` = {run_id,
        steps, head (the hash of the parent's last step taken, or its run hash)}; its first `steps`
        steps are the parent's, copied row for row (seeds, coefficients, rewards, failures, weights
        hash, timings, times) and chained anew under the new run id, so that it replays, trains and
        syncs on its own like any run.  One transaction: the new run exists whole or not at all."""
        parent = self.run(run_id)
        n = self.verify(run_id)
        if steps is None:
            steps = n
        if not 0 <= steps <= n:
            raise LedgerError(f"run {run_id}: cannot branch after {steps} steps (it has {n})")
        copied = list(self.steps(run_id, 0, steps))
        head = copied[-1].hash if copied else parent.hash
        config = {**parent.config, "parent": {"run_id": run_id, "steps": steps, "head": head}}
        new_id = uuid.uuid4().hex
        cfg = canonical_json(config)
        h = run_hash(new_id, parent.base_sha256, parent.base_name, cfg, parent.noise_spec)
        times = self.step_times(run_id, 0, steps)
        with self._writing("branch a run"):
            with self._tx():
                self.db.execute(INSERT_RUN, [new_id, time.time(), parent.base_sha256, parent.base_name, cfg,
                                              parent.noise_spec, h])
                self.db.execute(UPSERT_HEAD, [new_id, 0, h, time.time()])
                prev = h
                for rec in copied:  # the payload names the run: the same row hashes anew under new_id
                    rec.prev_hash, rec.hash = prev, chain_hash(bytes.fromhex(prev), rec.payload(new_id))
                    blobs = row_blobs(rec)
                    self._insert_row(new_id, rec, blobs, member_rows(new_id, rec.step, *blobs), times[rec.step])
                    prev = rec.hash
            self.checkpoint()
        return self.run(new_id)

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
        r = self._run_row(run_id)
        if r is None:
            raise LedgerError(f"{self.path}: no run {run_id!r}")
        try:
            config = json.loads(r["config"])
        except json.JSONDecodeError:
            raise LedgerError(f"{self.path}: run {run_id}: config is not JSON (edited?)") from None
        return Run(r["run_id"], r["base_sha256"], r["base_name"], config, r["noise_spec"], r["hash"])

    def _run_row(self, run_id: str) -> dict | None:
        cur = self.db.execute("select * from runs where run_id = ?", [run_id])
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def runs(self) -> list[Run]:
        return [self.run(r) for (r,) in self.db.execute("select run_id from runs order by created").fetchall()]

    # -- steps -------------------------------------------------------------------------
    def last_step(self, run_id: str) -> StepRecord | None:
        row = self.db.execute("select * from steps where run_id = ? order by step desc limit 1", [run_id]).fetchone()
        return self._record(row) if row else None

    def append_step(self, run_id: str, rec: StepRecord) -> StepRecord:
        """Record one step durably; its number must follow the last one."""
        run = self.run(run_id)
        with self._writing(f"record step {rec.step}"), self._tx():  # one transaction: check and insert
            last, blobs, members = self._next_row(run_id, rec, f"step {rec.step}")
            rec.prev_hash = run.hash if last is None else last.hash
            rec.hash = chain_hash(bytes.fromhex(rec.prev_hash), rec.payload(run_id))
            self._insert_row(run_id, rec, blobs, members, time.time())
            faults.point("ledger-write")  # the row written, its transaction not committed
        with self._writing(f"record step {rec.step}"):
            self.checkpoint()
        return rec

    def _next_row(self, run_id: str, rec: StepRecord, what: str):
        """(last step, the seeds/coefs/rewards blobs, member rows) of a step about to be written:
        it must follow the last one and hold one seed, coefficient and reward per member."""
        last = self.last_step(run_id)
        expected = 0 if last is None else last.step + 1
        if rec.step != expected:
            raise LedgerError(f"run {run_id}: {what} out of order (next is {expected})")
        seeds, coefs, rewards = blobs = row_blobs(rec)
        members = member_rows(run_id, rec.step, seeds, coefs, rewards)
        if not members:
            raise LedgerError(f"run {run_id}: {what} has {len(seeds) // 8} seeds, {len(coefs) // 4} "
                              f"coefficients and {len(rewards) // 8} rewards: one per member each is needed")
        return last, blobs, members

    def _insert_row(self, run_id: str, rec: StepRecord, blobs: tuple, members: list, created: float) -> None:
        """Write a chained step (hash and prev_hash set), its member rows and the run's new head,
        inside the caller's transaction."""
        seeds, coefs, rewards = blobs
        self.db.execute(INSERT_STEP, [run_id, rec.step, rec.threshold, seeds, coefs, rewards, rec.failures,
                                       canonical_json(rec.timings), rec.weights_sha256, rec.prev_hash, rec.hash,
                                       created])
        self.db.executemany(INSERT_MEMBERS, members)
        self.db.execute(UPSERT_HEAD, [run_id, rec.step + 1, rec.hash, time.time()])

    # -- rows received from a peer (ledger sync): verified, never computed ------------------
    def export_run(self, run_id: str) -> dict:
        """The run row as a peer needs it to create the same run (docs/sync-protocol.md):
        run_id, created, base_sha256, base_name, config (its canonical JSON text), noise_spec, hash."""
        self.run(run_id)  # named errors for a missing run or an unreadable config
        r = self._run_row(run_id)
        return {k: r[k] for k in ("run_id", "created", "base_sha256", "base_name", "config", "noise_spec", "hash")}

    def import_run(self, info: dict) -> Run:
        """Create a run received from a peer with the SAME run id, config, base and hash as its
        sender.  Nothing is computed from scratch: the run hash is recomputed from the received
        fields and must equal the one carried.  A run this ledger already holds with that hash is
        returned as it is (importing twice is harmless); one with another hash is refused."""
        try:
            run_id, cfg, base_sha, base_name = info["run_id"], info["config"], info["base_sha256"], info["base_name"]
            noise_spec, carried = info["noise_spec"], info["hash"]
            created = info.get("created")
            ok = (isinstance(run_id, str) and len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id)
                  and isinstance(cfg, str) and isinstance(base_name, str) and type(noise_spec) is int
                  and all(isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)
                          for h in (base_sha, carried)))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise LedgerError(f"{self.path}: the received run cannot be decoded (fields missing or of the wrong type)")
        try:
            canonical = canonical_json(json.loads(cfg)) == cfg
        except (ValueError, TypeError):
            canonical = False
        if not canonical:
            raise LedgerError(f"run {run_id}: the received config is not canonical JSON")
        expect = run_hash(run_id, base_sha, base_name, cfg, noise_spec)
        if expect != carried:
            raise LedgerError(f"run {run_id}: the received run does not hash to the value it carries "
                              f"({carried[:16]}…, recomputed {expect[:16]}…): refusing it")
        have = self.db.execute("select hash from runs where run_id = ?", [run_id]).fetchone()
        if have is not None:
            if have[0] != carried:
                raise LedgerError(f"run {run_id}: this ledger holds that run with another hash "
                                  f"({have[0][:16]}…, received {carried[:16]}…)")
            return self.run(run_id)
        with self._writing("import a run"):
            with self._tx():
                self.db.execute(INSERT_RUN, [run_id, _received_time(created), base_sha, base_name, cfg, noise_spec, carried])
                self.db.execute(UPSERT_HEAD, [run_id, 0, carried, time.time()])
            self.checkpoint()
        return self.run(run_id)

    def append_received(self, run_id: str, rec: StepRecord, created: float | None = None) -> StepRecord:
        """Record a step received from a peer, checked instead of computed: its number must follow
        the head, and its payload chained to the head (the run's hash or the last step's) must hash
        to the `hash` it carries.  One transaction, like append_step, with the members rows and the
        head; `created` is the sender's time of the step (the time of receipt when None)."""
        run = self.run(run_id)
        with self._writing(f"record received step {rec.step}"), self._tx():
            last, blobs, members = self._next_row(run_id, rec, f"received step {rec.step}")
            if not (0 < rec.threshold < 2**32) or rec.failures < 0 or len(rec.weights_sha256) != 64:
                raise LedgerError(f"run {run_id}: received step {rec.step} cannot be decoded")
            prev = run.hash if last is None else last.hash
            got = chain_hash(bytes.fromhex(prev), rec.payload(run_id))
            if got != rec.hash:
                raise LedgerError(f"run {run_id}: received step {rec.step} does not chain to step {rec.step - 1} "
                                  f"(it carries {rec.hash[:16]}…, its payload after {prev[:16]}… hashes to "
                                  f"{got[:16]}…): refusing it")
            rec.prev_hash = prev
            self._insert_row(run_id, rec, blobs, members, _received_time(created))
            faults.point("ledger-write")
        with self._writing(f"record received step {rec.step}"):
            self.checkpoint()
        return rec

    def step_hashes(self, run_id: str, steps) -> dict[int, str]:
        """The recorded hash of each of the given steps that the run holds."""
        out = {}
        for k in steps:
            row = self.db.execute("select hash from steps where run_id = ? and step = ?", [run_id, int(k)]).fetchone()
            if row is not None:
                out[int(k)] = row[0]
        return out

    def step_times(self, run_id: str, start: int = 0, stop: int | None = None) -> dict[int, float]:
        """`created` of the run's steps in [start, stop): when each was recorded (not chained)."""
        sql, args = "select step, created from steps where run_id = ? and step >= ?", [run_id, start]
        if stop is not None:
            sql, args = sql + " and step < ?", args + [stop]
        return {s: c for s, c in self.db.execute(sql, args).fetchall()}

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
        try:
            return self._verify(run_id)
        except sqlite3.Error as e:  # a table dropped or damaged
            raise LedgerError(f"{self.path}: not a usable ledger ({e})") from None
        except LedgerError as e:
            if self.wal_read:
                raise LedgerError(str(e) + self._wal_hint(run_id)) from None
            raise

    def _verify(self, run_id: str) -> int:
        run = self.run(run_id)
        expect = run_hash(run.run_id, run.base_sha256, run.base_name, canonical_json(run.config), run.noise_spec)
        if expect != run.hash:
            raise LedgerError(f"run {run_id}: the run row was edited (config or base model hash)")
        members = self._member_table(run_id) if self.has_members else None
        prev, n = run.hash, 0
        for rec in self.steps(run_id):
            if rec.step != n:
                raise LedgerError(f"run {run_id}: step {n} is missing")
            if rec.prev_hash != prev or chain_hash(bytes.fromhex(prev), rec.payload(run_id)) != rec.hash:
                raise LedgerError(f"run {run_id}: step {rec.step} was edited or does not chain to step {rec.step - 1}")
            if members is not None:
                self._check_members(run_id, rec, members.pop(rec.step, []))
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
        if members:
            raise LedgerError(f"run {run_id}: the members table has rows for step {min(members)}, which the ledger "
                              f"does not hold (the file was edited)")
        return n

    # -- members: the steps' blobs as rows (derived data, not chained) ----------------------
    def _member_table(self, run_id: str) -> dict[int, list[tuple]]:
        out: dict[int, list[tuple]] = {}
        for step, *row in self.db.execute("select step, member, seed, reward, coef_q16 from members where run_id = ? "
                                          "order by step, member", [run_id]).fetchall():
            out.setdefault(step, []).append(tuple(row))
        return out

    def _check_members(self, run_id: str, rec: StepRecord, rows: list[tuple]) -> None:
        """The step's member rows must say what its blobs say (the blobs are what the chain covers)."""
        want = [r[2:] for r in member_rows(run_id, rec.step, *row_blobs(rec))]
        if rows == want:
            return
        where = (f"run {run_id}: step {rec.step}: its rows in the members table do not match the step row "
                 f"(the members table was edited; the step row, which the hash chain covers, is the record)")
        if len(rows) != len(want):
            raise LedgerError(f"{where}: {len(rows)} member rows for {len(want)} members")
        for got, exp in zip(rows, want):
            if got != exp:
                diff = ", ".join(f"{name} {g!r} (the step row has {e!r})"
                                 for name, g, e in zip(("member", "seed", "reward", "coef_q16"), got, exp) if g != e)
                raise LedgerError(f"{where}: member {exp[0]}: {diff}")

    def members(self, run_id: str, step: int | None = None) -> list[dict]:
        """One dict per member (step, member, seed, reward or None where it failed, coef_q16, and
        with several --reward `rewards`: each one's batch mean), in step and member order: from the members table, or from the steps' blobs in a ledger
        written before it and opened read-only."""
        keys = ("step", "member", "seed", "reward", "coef_q16")
        where, args = ("run_id = ?", [run_id]) if step is None else ("run_id = ? and step = ?", [run_id, step])
        if self.has_members:
            rows = self.db.execute(f"select {', '.join(keys)} from members where {where} order by step, member", args)
            out = [dict(zip(keys, r)) for r in rows.fetchall()]
            # several --reward: each one's batch mean per member, from the step row's reward_parts
            parts = {}
            for st, t in self.db.execute(f"select step, timings from steps where {where} and timings like "
                                         "'%reward_parts%'", args).fetchall():
                try:
                    parts[st] = json.loads(t).get("reward_parts")
                except (ValueError, AttributeError):
                    continue
            for m in out:
                p = parts.get(m["step"])
                if isinstance(p, dict):
                    m["rewards"] = {k: v[m["member"]] for k, v in p.items()
                                    if isinstance(v, list) and m["member"] < len(v)}
            return out
        out = []
        for rec in self.steps(run_id, *(() if step is None else (step, step + 1))):
            for i, (seed, reward, coef) in enumerate(zip(rec.seeds.tolist(), rec.rewards.tolist(), rec.coefs_q16.tolist())):
                out.append({"step": rec.step, "member": i, "seed": seed,
                            "reward": None if reward != reward else reward, "coef_q16": coef})
        return out

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
            self.db.execute("insert into evals (run_id, step, split, metrics, created) values (?, ?, ?, ?, ?) "
                            "on conflict(run_id, step, split) do update set metrics = excluded.metrics, "
                            "created = excluded.created", [run_id, step, split, canonical_json(metrics), time.time()])
        with self._writing("record an evaluation"):
            self.checkpoint()

    def evals(self, run_id: str) -> list[dict]:
        rows = self.db.execute("select step, split, metrics from evals where run_id = ? order by step", [run_id])
        return [{"step": s, "split": sp, **json.loads(m)} for s, sp, m in rows.fetchall()]

    def close(self) -> None:
        self.db.close()
        self._drop_copy()


def open_verified(path: Path, run_id: str | None = None) -> tuple["Ledger", "Run", int]:
    """(ledger, run, verified step count): opened read-only, its chain and head checked; the one
    reader that log, report, replay, export, verify, dump and sync share.  LedgerError names the
    problem (not a file, no such run, a broken chain); the ledger is closed when it is raised."""
    lg = None
    try:
        lg = Ledger(path, readonly=True)  # a folder, or no file, is refused here
        run = lg.run(run_id)
        return lg, run, lg.verify(run.run_id)
    except LedgerError:
        if lg is not None:
            lg.close()
        raise


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
