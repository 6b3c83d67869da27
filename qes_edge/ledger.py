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

import hashlib
import json
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


MIGRATIONS = [("0001_initial", _migration_0001_initial), ("0002_evals", _migration_0002_evals)]


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
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self.db = sqlite_utils.Database(conn)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: not a usable ledger ({e})") from None

    # -- schema ------------------------------------------------------------------------
    def _migrate(self) -> None:
        db = self.db
        tables = set(db.table_names())
        if tables and "_migrations" not in tables:
            raise LedgerError(f"{self.path}: an SQLite file, but not a qes-edge ledger (tables: {sorted(tables)})")
        if "_migrations" not in tables:
            db["_migrations"].create({"name": str, "applied": float}, pk="name")
        done = {r["name"] for r in db["_migrations"].rows}
        unknown = done - {n for n, _ in MIGRATIONS}
        if unknown:
            raise LedgerError(f"{self.path}: written by a newer qes-edge (migrations {sorted(unknown)})")
        for name, fn in MIGRATIONS:
            if name in done:
                continue
            with db.conn:
                fn(db)
                db["_migrations"].insert({"name": name, "applied": time.time()})
        if db["meta"].count == 0:
            db["meta"].insert({"key": "format", "value": LEDGER_FORMAT})
        fmt = db.execute("select value from meta where key = 'format'").fetchone()
        if not fmt or fmt[0] != LEDGER_FORMAT:
            raise LedgerError(f"{self.path}: not a qes-edge ledger")

    # -- runs --------------------------------------------------------------------------
    def create_run(self, base_sha256: str, base_name: str, config: dict, noise_spec: int) -> Run:
        run_id = uuid.uuid4().hex
        cfg = canonical_json(config)
        h = _h(GENESIS, run_id.encode(), bytes.fromhex(base_sha256), base_name.encode(), cfg.encode(),
               struct.pack("<q", noise_spec))
        with self.db.conn:
            self.db["runs"].insert({"run_id": run_id, "created": time.time(), "base_sha256": base_sha256,
                                    "base_name": base_name, "config": cfg, "noise_spec": noise_spec, "hash": h})
        return self.run(run_id)

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
        with self.db.conn:  # one transaction: the chain check and the insert see the same state
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
        return rec

    def _record(self, row) -> StepRecord:
        cols = [d[0] for d in self.db.execute("select * from steps limit 0").description]
        r = dict(zip(cols, row))
        return StepRecord(step=r["step"], threshold=r["threshold"],
                          seeds=np.frombuffer(r["seeds"], "<i8").astype(np.int64),
                          coefs_q16=np.frombuffer(r["coefs_q16"], "<i4").astype(np.int32),
                          rewards=np.frombuffer(r["rewards"], "<f8").astype(np.float64),
                          weights_sha256=r["weights_sha256"], timings=json.loads(r["timings"]),
                          failures=r["failures"], hash=r["hash"], prev_hash=r["prev_hash"])

    def steps(self, run_id: str, start: int = 0, stop: int | None = None) -> Iterator[StepRecord]:
        sql = "select * from steps where run_id = ? and step >= ?"
        args: list = [run_id, start]
        if stop is not None:
            sql += " and step < ?"
            args.append(stop)
        for row in self.db.execute(sql + " order by step", args).fetchall():
            try:
                yield self._record(row)
            except (ValueError, json.JSONDecodeError) as e:
                raise LedgerError(f"run {run_id}: a step row cannot be decoded ({e})") from None

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
        return n

    def record_eval(self, run_id: str, step: int, split: str, metrics: dict) -> None:
        with self.db.conn:
            self.db["evals"].upsert({"run_id": run_id, "step": step, "split": split,
                                     "metrics": canonical_json(metrics), "created": time.time()},
                                    pk=("run_id", "step", "split"))

    def evals(self, run_id: str) -> list[dict]:
        rows = self.db.execute("select step, split, metrics from evals where run_id = ? order by step", [run_id])
        return [{"step": s, "split": sp, **json.loads(m)} for s, sp, m in rows.fetchall()]

    def close(self) -> None:
        self.db.conn.close()
