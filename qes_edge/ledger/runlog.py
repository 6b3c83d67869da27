"""A run's record, step by step: what `qes-edge log` prints and `qes-edge report` draws.

RUN, as the commands take it, is a ledger file or a run id (or a unique prefix of one, 4 hex
digits or more), looked up in the ledgers of `<home>/runs` and in the ledgers of the overnight
agent's jobs (`<home>/daemon.db`, table `jobs`, column `ledger`, where it exists).  Ledgers are
opened read-only and verified before anything is read from them; everything shown comes from
the steps' rows (the blobs the hash chain covers), so a ledger older than the members table
reads the same."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from qes_edge.home import DAEMON_DB, home, runs_dir
from qes_edge.ledger.store import Ledger, LedgerError, Run, StepRecord, check_not_directory, open_verified

#: the timings every step records, in the order a step spends them
PHASES = ("perturb_s", "eval_s", "restore_s", "update_s", "digest_s")
RUN_ID_PREFIX = re.compile(r"[0-9a-fA-F]{4,32}")


class RunNotFound(ValueError):
    """RUN names no ledger and no run (or more than one run)."""


# -- finding a run -------------------------------------------------------------------------

def _daemon_ledgers(home: Path) -> list[Path]:
    """The ledgers of the overnight agent's jobs; none when it never ran (or its table differs)."""
    db = home / DAEMON_DB
    if not db.is_file():
        return []
    quoted = str(db.resolve()).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    try:
        conn = sqlite3.connect(f"file:{quoted}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("select distinct ledger from jobs where ledger is not null").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    out = []
    for (p,) in rows:
        if isinstance(p, str) and p:
            p = Path(p).expanduser()
            out.append(p if p.is_absolute() else home / p)
    return out


def known_ledgers() -> list[Path]:
    """Every ledger a run id is looked up in: `<home>/runs/*.qes`, then the daemon's jobs'."""
    folder = runs_dir()
    found = sorted(folder.glob("*.qes")) if folder.is_dir() else []
    found += _daemon_ledgers(home())
    seen, out = set(), []
    for p in found:
        key = p.resolve() if p.exists() else p
        if key not in seen and p.is_file():
            seen.add(key)
            out.append(p)
    return out


def _run_ids(path: Path) -> list[str]:
    try:
        lg = Ledger(path, readonly=True)
    except LedgerError:
        return []
    try:
        return [r for (r,) in lg.db.execute("select run_id from runs order by created").fetchall() if isinstance(r, str)]
    except sqlite3.Error:
        return []
    finally:
        lg.close()


def match_run_id(ids: list[str], prefix: str) -> list[str]:
    prefix = prefix.lower()
    return [r for r in ids if r.startswith(prefix)]


def find_run(spec: str) -> tuple[Path, str | None]:
    """(ledger path, run id or None for "the ledger's latest or --run-id") for RUN; raises
    RunNotFound with a one-line reason."""
    p = Path(spec).expanduser()
    try:
        check_not_directory(p)
    except LedgerError as e:
        raise RunNotFound(str(e)) from None
    if p.exists():
        return p, None
    if not RUN_ID_PREFIX.fullmatch(spec):
        raise RunNotFound(f"{spec}: no such ledger file, and not a run id (4 to 32 hex digits)")
    matches = [(path, r) for path in known_ledgers() for r in match_run_id(_run_ids(path), spec)]
    if not matches:
        where = f"the ledgers in {runs_dir()}" + (" or the daemon's jobs" if (home() / DAEMON_DB).is_file() else "")
        raise RunNotFound(f"no run {spec} in {where}; give the ledger's path")
    ids = sorted({r for _, r in matches})
    if len(ids) > 1:
        shown = ", ".join(f"{r[:12]} ({path.name})" for path, r in matches[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        raise RunNotFound(f"{spec} matches {len(ids)} runs: {shown}{more}; give more of the run id")
    if len(matches) > 1:
        raise RunNotFound(f"run {ids[0]} is in {len(matches)} ledgers ({', '.join(str(p) for p, _ in matches)}); "
                          "give the ledger's path")
    return matches[0]


def open_run(spec: str, run_id: str | None):
    """For the commands: (ledger path, read-only Ledger, Run, verified step count).  A bad RUN or
    --run-id raises RunNotFound, a bad ledger LedgerError, each with a one-line reason."""
    path, found = find_run(spec)
    if found is not None and run_id is not None and not found.startswith(run_id.lower()):
        raise RunNotFound(f"--run-id {run_id} is not the run {spec} names ({found[:12]}); --run-id picks a run in a ledger file")
    if found is None and run_id is not None and len(run_id) != 32:
        if not RUN_ID_PREFIX.fullmatch(run_id):
            raise RunNotFound(f"--run-id {run_id}: not a run id (4 to 32 hex digits)")
        ids = match_run_id(_run_ids(path), run_id)
        if len(ids) != 1:
            raise RunNotFound(f"{path}: {'no run' if not ids else f'{len(ids)} runs'} with an id starting {run_id}")
        found = ids[0]
    try:
        lg, run, n = open_verified(path, found or run_id)
    except sqlite3.DatabaseError as e:  # a file damaged beyond what opening it shows
        raise LedgerError(f"{path}: not a usable ledger ({e})") from None
    return path, lg, run, n


# -- what a run holds ----------------------------------------------------------------------

def _num(x):
    """A JSON-safe number: None for NaN or infinity."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def step_row(rec: StepRecord, created: float | None = None) -> dict:
    """One step as a JSON-ready dict (NaN as None): train --json's step event, and more."""
    r = rec.rewards
    ok = r[~np.isnan(r)]
    return {"event": "step", "step": rec.step,
            "reward": _num(ok.mean()) if ok.size else None,
            "min_reward": _num(ok.min()) if ok.size else None,
            "max_reward": _num(ok.max()) if ok.size else None,
            "failures": rec.failures, "members": len(r), "changed": rec.timings.get("changed"),
            "coef_q16_min": int(rec.coefs_q16.min()), "coef_q16_max": int(rec.coefs_q16.max()),
            "seeds": rec.seeds.tolist(), "coefs_q16": rec.coefs_q16.tolist(), "rewards": [_num(x) for x in r],
            "threshold": rec.threshold, "timings": rec.timings, "weights_sha256": rec.weights_sha256,
            "hash": rec.hash, "created": created}


def eval_row(ev: dict) -> dict:
    metrics = {k: v for k, v in ev.items() if k not in ("step", "split")}
    return {"event": "eval", "step": ev["step"], "split": ev["split"],
            **{k: _num(v) if isinstance(v, float) else v for k, v in metrics.items()}}


#: what `--step best` compares held-out evaluations by: the first of these the task records
BEST_BY = ("balanced_accuracy", "accuracy", "reward")


def best_heldout(evals: list[dict], n_steps: int | None = None) -> tuple[int, str, float] | None:
    """(step, metric, score) of the held-out evaluation that scored highest (at most n_steps in),
    by the first metric of BEST_BY the evaluations record; the earliest of ties (the fewest edits
    for the same score); NaN never wins.  None when the run has no held-out score."""
    scored = [e for e in evals if e.get("split") == "heldout" and (n_steps is None or e.get("step", -1) <= n_steps)]
    by = next((k for k in BEST_BY if any(_num(e.get(k)) is not None for e in scored)), None)
    if by is None:
        return None
    best = max((e for e in scored if _num(e.get(by)) is not None), key=lambda e: (e[by], -e["step"]))
    return best["step"], by, float(best[by])


def choose_step(spec: str | int | None, n_steps: int, evals: list[dict]) -> tuple[int, str]:
    """The number of steps to rebuild, from --step: None (all of them), N (the first N, 0 the base)
    or "best" (best_heldout's step).  Returns (steps, why); ValueError says what is wrong."""
    if spec is None:
        return n_steps, f"all {n_steps} steps"
    text = str(spec).strip().lower()
    if text == "best":
        best = best_heldout(evals, n_steps)
        if best is None:
            raise ValueError("--step best needs held-out evaluations, and this run has none (train with --eval-every N)")
        step, by, score = best
        return step, f"step {step} of {n_steps}, the best held-out {by} ({score:.3f})"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--step {spec!r}: give a number of steps (0 to {n_steps}) or 'best'") from None
    if not 0 <= k <= n_steps:
        raise ValueError(f"--step {k}: the run has {n_steps} step{'s' if n_steps != 1 else ''} (give 0 to {n_steps})")
    return k, f"the first {k} of {n_steps} steps"


@dataclass
class RunRecord:
    path: Path
    run: Run
    n_steps: int
    head: str
    steps: list[dict] = field(default_factory=list)   # step_row()s, in order
    evals: list[dict] = field(default_factory=list)   # eval_row()s, by step

    def header(self) -> dict:
        cfg = self.run.config
        return {"event": "run", "ledger": str(self.path), "run_id": self.run.run_id, "base_name": self.run.base_name,
                "base_sha256": self.run.base_sha256, "task": cfg.get("task"), "config": cfg,
                "steps": self.n_steps, "head": self.head}

    def evals_of(self, split: str) -> list[dict]:
        return [e for e in self.evals if e["split"] == split]

    def events(self) -> Iterator[dict]:
        """Steps in order, each evaluation before the step it was made before (an evaluation at
        step k scores the weights after k steps: those step k starts from)."""
        evals = sorted(self.evals, key=lambda e: e["step"])
        i = 0
        for row in self.steps:
            while i < len(evals) and evals[i]["step"] <= row["step"]:
                yield evals[i]
                i += 1
            yield row
        yield from evals[i:]


def load(path: Path, lg: Ledger, run: Run, n_steps: int, tail: int | None = None) -> RunRecord:
    """The verified run's steps (the last `tail` of them) and its evaluations from there on."""
    start = max(0, n_steps - tail) if tail else 0
    created = dict(lg.db.execute("select step, created from steps where run_id = ? and step >= ?",
                                 [run.run_id, start]).fetchall())
    steps = [step_row(rec, created.get(rec.step)) for rec in lg.steps(run.run_id, start)]
    evals = [eval_row(e) for e in lg.evals(run.run_id) if e["step"] >= start]
    return RunRecord(path, run, n_steps, lg.head_hash(run.run_id), steps, evals)


# -- as text -------------------------------------------------------------------------------

def fmt_value(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


def split_name(split: str) -> str:
    return "held-out" if split == "heldout" else split


def after(step: int) -> str:
    return "at the start" if step == 0 else f"after {step} step{'s' if step != 1 else ''}"


def fmt_metric(key: str, v) -> str:
    if key.endswith("_mb") and isinstance(v, float):
        return f"{v:.1f}"  # megabytes: to the tenth, as recorded
    return fmt_value(v)


def metrics_text(ev: dict) -> str:
    return ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in ev.items() if k not in ("event", "step", "split"))


def eval_text(ev: dict) -> str:
    """An evaluation in words: `held-out after 2 steps: accuracy 0.208, reward 0.258`."""
    return f"{split_name(ev['split'])} {after(ev['step'])}: {metrics_text(ev)}"


def eval_line(ev: dict) -> str:
    return "      " + eval_text(ev)


COLUMNS = (f"{'step':>5} {'reward':>7} {'min':>7} {'max':>7} {'fail':>4}  {'q16 coefficients':<19}"
           f"{'perturb':>8} {'eval':>8} {'restore':>8} {'update':>8} {'digest':>8} {'changed':>10}")


def _r(v) -> str:
    return f"{v:7.3f}" if v is not None else f"{'—':>7}"


def _s(v) -> str:
    return f"{v:7.2f}s" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{'—':>8}"


def part_means(timings: dict) -> dict[str, float | None]:
    """Several --reward: each one's mean over the step's members (reward_parts; None: none scored)."""
    parts = timings.get("reward_parts")
    out = {}
    for name, xs in (parts.items() if isinstance(parts, dict) else ()):
        ok = [x for x in xs if isinstance(x, (int, float))] if isinstance(xs, list) else []
        out[name] = sum(ok) / len(ok) if ok else None
    return out


def step_line(row: dict) -> str:
    t = row["timings"]
    coefs = f"{row['coef_q16_min']:+d}..{row['coef_q16_max']:+d}"
    changed = t.get("changed")
    changed = f"{changed:>10,}" if isinstance(changed, int) and not isinstance(changed, bool) else f"{'—':>10}"
    line = (f"{row['step']:>5} {_r(row['reward'])} {_r(row['min_reward'])} {_r(row['max_reward'])} "
            f"{row['failures']:>4}  {coefs:<19}" + " ".join(_s(t.get(k)) for k in PHASES) + f" {changed}")
    extra = []
    for k, v in sorted(t.items(), key=lambda kv: kv[0] != "rss_mb"):  # memory first, then as recorded
        if k in PHASES or k == "changed":
            continue
        if k == "rss_mb" and isinstance(v, (int, float)):
            extra.append(f"rss {v:.1f} MB")
        elif k == "reward_parts" and isinstance(v, dict):
            extra += [f"{name} {m:.3f}" if m is not None else f"{name} —" for name, m in part_means(t).items()]
        else:
            extra.append(f"{k} {fmt_value(v)}")
    return line + ("  " + ", ".join(extra) if extra else "")


def human_lines(rec: RunRecord) -> Iterator[str]:
    run = rec.run
    shown = f"last {len(rec.steps)} of {rec.n_steps} steps" if len(rec.steps) < rec.n_steps else f"{rec.n_steps} steps"
    yield (f"run {run.run_id} in {rec.path}: {run.base_name} (sha256 {run.base_sha256[:12]}…), "
           f"task {run.config.get('task')}, {shown}, head {rec.head[:16]}…")
    yield COLUMNS
    for ev in rec.events():
        yield step_line(ev) if ev["event"] == "step" else eval_line(ev)


def json_lines(rec: RunRecord) -> Iterator[str]:
    yield json.dumps(rec.header(), allow_nan=False)
    for ev in rec.events():
        yield json.dumps(ev, allow_nan=False)


def when(created: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "—"
