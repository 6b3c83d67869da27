"""Step time of a shared population (docs/sync-protocol.md §9): one process against two local
processes (`qes-edge train --peers` + `qes-edge worker` over loopback TCP).

Three runs of the same options (population 8, batch 8, the default sentiment task, run seed 0):

- `one_t1`: one process, --threads 1;
- `one_t2`: one process, --threads 2 (all the cores a 2-core machine has, in one process);
- `two_t1`: a coordinator with --threads 1 and a worker with --threads 1, each evaluating half
  the members (two processes on the same cores).

A step's time is the time between consecutive steps' `created` in the ledger (the first step is
left out: it follows the start's held-out evaluation).  The two --threads 1 runs must record the
same ledger (seeds, coefficients, rewards, weights hashes), which this checks; --threads 2 scores
are not bit-identical to --threads 1 ones, so that run is a timing only.

    python benchmarks/bench_population.py [--steps 5] [--population 8] [--batch 8]

Writes benchmarks/results/population.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qes_edge.ledger.store import Ledger

ROOT = Path(__file__).resolve().parent.parent


def qes(args, **kw):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "qes_edge", *args], env=env, text=True, **kw)


def ledger_of(path: Path):
    lg = Ledger(path, readonly=True)
    try:
        run = lg.run()
        lg.verify(run.run_id)
        rows = list(lg.steps(run.run_id))
        times = lg.step_times(run.run_id)
    finally:
        lg.close()
    return rows, [times[r.step] for r in rows]


def train(folder: Path, name: str, common: list, threads: int, peers: str | None = None) -> dict:
    ledger = folder / f"{name}.qes"
    args = [*common, "--threads", str(threads), "--ledger", str(ledger)] + (["--peers", peers] if peers else [])
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = qes(["train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{name}: train failed:\n{err[-3000:]}")
    rows, created = ledger_of(ledger)
    dt = np.diff(created)  # step k's time: created[k] - created[k-1]
    return {"threads": threads, "peers": bool(peers), "steps": len(rows), "wall_s": round(wall, 2),
            "step_s": [round(float(x), 3) for x in dt], "step_s_mean": round(float(dt.mean()), 3),
            "eval_s_mean": round(float(np.mean([r.timings["eval_s"] for r in rows[1:]])), 3),
            "eval_s_per_member": round(float(np.mean([r.timings["eval_s"] / len(r.seeds) for r in rows[1:]])), 3),
            "update_s_mean": round(float(np.mean([r.timings["update_s"] for r in rows[1:]])), 3),
            "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "remote_members": [r.timings.get("remote_members", 0) for r in rows],
            "rows": [(r.seeds.tolist(), r.coefs_q16.tolist(), r.rewards.tobytes().hex(), r.weights_sha256)
                     for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "population.json")
    a = ap.parse_args()
    common = ["--population", str(a.population), "--batch", str(a.batch), "--steps", str(a.steps), "--seed", "0"]
    res = {}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        os.environ["QES_EDGE_HOME"] = str(folder / "home")
        for name, threads in (("one_t1", 1), ("one_t2", 2)):
            res[name] = train(folder, name, common, threads)
            print(f"{name}: {res[name]['step_s_mean']:.2f} s/step {res[name]['step_s']}", flush=True)
        w = qes(["worker", "--on", "socket://127.0.0.1:0", "--ledger", str(folder / "worker.qes"), "--threads", "1",
                 "--once"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            url = re.search(r"listening on (socket://\S+)", w.stderr.readline()).group(1)
            res["two_t1"] = train(folder, "two_t1", common, 1, peers=url)
            w.communicate(timeout=120)
        finally:
            if w.poll() is None:
                w.kill()
        print(f"two_t1: {res['two_t1']['step_s_mean']:.2f} s/step {res['two_t1']['step_s']}", flush=True)
    same = res["one_t1"]["rows"] == res["two_t1"]["rows"]
    for r in res.values():
        del r["rows"]
    out = {
        "what": "step time (s) of one process vs a coordinator + one worker over loopback TCP; population "
                f"{a.population}, batch {a.batch}, task sentiment, {a.steps} steps (the first left out)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "load_avg_1min is the machine's 1-minute load before and after each run (other users' jobs "
                "included): above 2 on 2 cores, the processes here got less than a core each and the times are "
                "contended ones. The two processes share this machine's cores: on a 2-core machine two --threads 1 processes use "
                "the same 2 cores as one --threads 2 process, so the comparison is process-level parallelism "
                "(each process runs llama.cpp single-threaded on half the members) against llama.cpp's own "
                "threads; on separate devices each worker brings its own cores",
        "same_ledger_one_t1_two_t1": same,
        "runs": res,
        "speedup_two_t1_vs_one_t1": round(res["one_t1"]["step_s_mean"] / res["two_t1"]["step_s_mean"], 3),
        "speedup_two_t1_vs_one_t2": round(res["one_t2"]["step_s_mean"] / res["two_t1"]["step_s_mean"], 3),
        "command": "python benchmarks/bench_population.py " + " ".join(sys.argv[1:]),
    }
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("same_ledger_one_t1_two_t1", "speedup_two_t1_vs_one_t1",
                                          "speedup_two_t1_vs_one_t2")}))
    if not same:
        raise SystemExit("the two --threads 1 runs recorded different ledgers")


if __name__ == "__main__":
    main()
