"""What `qes-edge status` shows: the daemon (running or not, paused and why), the run it trains
(step, reward and held-out curves, ETA), the queue, pauses and memory.  Everything is read
while the daemon writes: daemon.db through WAL, the ledger read-only; nothing here writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from qes_edge.agent.daemon import daemon_paths, running_pid
from qes_edge.agent.db import DaemonDB
from qes_edge.ledger.runlog import PHASES, best_heldout

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values, width: int = 40) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)[-width:]
    if v.size == 0:
        return ""
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return SPARKS[3] * v.size
    return "".join(SPARKS[int(round((x - lo) / (hi - lo) * (len(SPARKS) - 1)))] for x in v)


def _duration(s: float | None) -> str:
    if s is None or not np.isfinite(s):
        return "?"
    s = int(s)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s % 60:02d}s" if m else f"{s}s")


def _run_progress(ledger: str, run_id: str | None) -> dict:
    from qes_edge.ledger.store import Ledger, LedgerError
    out: dict = {"ledger": ledger}
    if not Path(ledger).is_file():
        return {**out, "error": "the ledger does not exist yet"}
    try:
        lg = Ledger(ledger, readonly=True)
    except LedgerError as e:
        return {**out, "error": str(e)}
    try:
        run = lg.run(run_id)
        steps = list(lg.steps(run.run_id))
        evals = lg.evals(run.run_id)
    except LedgerError as e:
        return {**out, "error": str(e)}
    finally:
        lg.close()
    rewards = [float(np.nanmean(r.rewards)) if np.isfinite(r.rewards).any() else None for r in steps]
    heldout = [e for e in evals if e.get("split") == "heldout"]
    best = best_heldout(evals)  # the same rule as `export --step best` and `report`
    metric = best[1] if best else None
    times = [sum(r.timings.get(k, 0.0) for k in PHASES) for r in steps]
    memory = [e for e in evals if e.get("split") == "memory"]
    from qes_edge.training.no_signal import streak
    n_quiet, cause = streak(r.timings for r in steps)
    return {**out, "run_id": run.run_id, "model": run.base_name, "task": run.config.get("task"), "step": len(steps),
            "no_signal_steps": n_quiet, "no_signal_cause": cause,
            "rewards": rewards, "heldout_metric": metric,
            "heldout": [{"step": e["step"], "value": e.get(metric)} for e in heldout] if metric else [],
            "best_heldout": {"step": best[0], "value": best[2]} if best else None,
            "median_step_s": float(np.median(times[-20:])) if times else None,
            "peak_rss_mb": max((r.timings.get("rss_mb", 0) for r in steps), default=None) or None,
            "inference_rss_mb": memory[-1].get("inference_rss_mb") if memory else None}


def collect(home: Path) -> dict:
    paths = daemon_paths(home)
    pid = running_pid(paths["lock"])
    out: dict = {"home": str(home), "daemon": {"running": pid is not None, "pid": pid}, "queue": [], "run": None,
                 "pauses": []}
    if not paths["db"].exists():
        return out
    import sqlite3
    try:
        db = DaemonDB(paths["db"], readonly=True)
    except sqlite3.Error:  # created this instant by a starting daemon
        return out
    try:
        state = db.state()
        jobs = db.jobs()
        pauses = db.events(kinds=("pause", "resume"), limit=20)
        last_stop = db.events(kinds=("stop", "error"), limit=1)
    except sqlite3.Error:
        return out
    finally:
        db.close()
    out["daemon"].update({k: state.get(k) for k in ("status", "pause_reason", "paused_since", "started", "idle_rss_mb",
                                                     "peak_rss_mb", "inference_rss_mb", "stop_reason", "budget")})
    if pid is None and state.get("status") not in (None, "stopped"):
        out["daemon"]["status"] = "not running (it was killed or crashed; its run resumes at the next start)"
    if last_stop:
        out["daemon"]["last"] = last_stop[0]["message"]
    out["queue"] = [{"id": j.id, "state": j.state, "model": Path(j.model).name, "task": j.task, "steps": j.steps,
                     "ledger": j.ledger, "error": j.error} for j in jobs]
    out["pauses"] = [{"time": e["time"], "kind": e["kind"], "message": e["message"]} for e in pauses]
    current = next((j for j in jobs if j.id == state.get("job")), None) if pid else None
    current = current or next((j for j in jobs if j.state == "running"), None) or \
        next((j for j in reversed(jobs) if j.state in ("done", "failed")), None)
    if current is not None:
        run = _run_progress(current.ledger, current.run_id)
        run.update(job=current.id, state=current.state, target=current.steps)
        if run.get("median_step_s") and "step" in run:
            run["eta_s"] = max(0, current.steps - run["step"]) * run["median_step_s"]
        out["run"] = run
    return out


def render(info: dict, console) -> None:
    d = info["daemon"]
    if d["running"]:
        up = _duration(time.time() - d["started"]) if d.get("started") else "?"
        line = f"daemon: [green]running[/] (pid {d['pid']}, up {up}) — {d.get('status') or '?'}"
        if d.get("pause_reason"):
            since = time.strftime("%H:%M", time.localtime(d["paused_since"])) if d.get("paused_since") else "?"
            line += f"\n  [yellow]paused since {since}:[/] {d['pause_reason']}"
    else:
        line = f"daemon: not running ({d.get('status') or 'never started on this home'})"
        if d.get("last"):
            line += f"\n  last: {d['last']}"
    console.print(line)
    r = info.get("run")
    if r:
        head = f"job {r['job']} ({r['state']}): {r.get('model', '?')} task {r.get('task', '?')}"
        if "error" in r:
            console.print(f"{head}\n  {r['error']}", markup=False)
        else:
            console.print(f"{head}, step {r['step']}/{r['target']}, run {r['run_id'][:8]}, ledger {r['ledger']}",
                          markup=False)
            rw = [x for x in r["rewards"] if x is not None]
            if rw:
                console.print(f"  reward    {sparkline(r['rewards'])}  {rw[0]:.3f} → {rw[-1]:.3f} "
                              f"(best {max(rw):.3f})", markup=False)
            vals = [h["value"] for h in r["heldout"] if h["value"] is not None]
            if vals:
                b = r.get("best_heldout")
                best = f", best {b['value']:.3f} at step {b['step']}" if b else ""
                console.print(f"  held-out  {sparkline(vals)}  {r['heldout_metric']} {vals[0]:.3f} → {vals[-1]:.3f} "
                              f"({len(vals)} evaluations{best})", markup=False)
            from qes_edge.training.no_signal import alarm
            quiet = alarm(r.get("no_signal_steps", 0), r.get("no_signal_cause"))
            if quiet:
                console.print(f"  [yellow]{quiet}[/]", highlight=False)
            if r["state"] == "running" and r.get("eta_s") is not None:
                console.print(f"  ETA {_duration(r['eta_s'])} (median step {r['median_step_s']:.1f} s)")
            peak, inf = r.get("peak_rss_mb") or d.get("peak_rss_mb"), r.get("inference_rss_mb")
            if peak:
                ratio = f" = {peak / inf:.2f}× the model loaded for inference ({inf:.0f} MB)" if inf else ""
                console.print(f"  memory: peak {peak:.0f} MB{ratio}")
    if d.get("idle_rss_mb"):
        console.print(f"  daemon idle RSS: {d['idle_rss_mb']:.0f} MB")
    if info["pauses"]:
        console.print("pauses:")
        for e in info["pauses"][-6:]:
            console.print(f"  {time.strftime('%m-%d %H:%M', time.localtime(e['time']))} {e['message']}", markup=False)
    if info["queue"]:
        counts = {}
        for j in info["queue"]:
            counts[j["state"]] = counts.get(j["state"], 0) + 1
        console.print("queue: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        for j in info["queue"]:
            if j["state"] in ("queued", "running", "failed"):
                extra = f" — {j['error']}" if j["error"] and j["state"] == "failed" else ""
                console.print(f"  #{j['id']} {j['state']}: {j['model']} {j['task']} to step {j['steps']}{extra}",
                              markup=False)
    else:
        console.print("queue: empty (qes-edge queue add …)")


def as_json(info: dict) -> str:
    return json.dumps(info, allow_nan=False, default=str)
