"""Issue 22's A/B: the coefficient schemes and error feedback, on several tasks and run seeds,
each variant at the alphas of a small sweep, held-out at steps 0/10/20/40, codes changed per step.

    python benchmarks/ab_coefficients.py [--tasks sentiment,continents,capitals] [--seeds 0,1,2]
        [--variants pairs,zscore,pairs-noef] [--alphas 0.0005,0.001,0.002] [--steps 40]
        [--population 16] [--batch 24] [--threads 2] [--shard I/N] [--list]

Each run is what a user runs: a fresh `qes-edge train --json` process on its own ledger in its own
temporary QES_EDGE_HOME (the default model; sentiment is the built-in task, continents and
capitals are the choice tasks of benchmarks/data through the model's chat template), with
--eval-every 10.  Results go to benchmarks/results/ab.json one run at a time, so the script can be
stopped and started again (a run already there is not run again) and split between two processes
(--shard 0/2 and --shard 1/2, each with --threads 1: at most two heavy processes on 2 cores).
--list prints the table of what is there (and what is missing), with the held-out reward at step 40
beside the task's metric.

The sweep: run seed 0 of every variant at the --alphas, then seeds 1 and 2 of each variant at its
best alpha (--variants V --alphas BEST --seeds 1,2).  A run at another --sigma, --population or
--batch (calibrate's recommendation, for the check of issue 22 item 4) is kept under a key that
names them.

--calibrated H (issue 22 item 4's check): for each task and seed, `qes-edge calibrate --hours H
--json` on a fresh home, then `qes-edge train` with exactly the sigma, alpha, population, batch and
steps it recommends (held-out at four points of the run), kept as `task|calibrated|Hh|seed` beside
the sweep's rows.  With H the time a sweep run takes (about 0.35 h for sentiment here), it answers
"does following calibrate for that budget train at least as well as the sweep's best".

At population 16, batch 24, --threads 1 two at a time on this 2-core machine: about
20 minutes a sentiment run, 70 a continents run (five choices of several tokens each); forward
passes are 95% of it."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "ab.json"
TASKS = {"sentiment": ["--task", "sentiment"],
         "continents": ["--task", "choice", "--data", str(HERE / "data" / "continents.jsonl")],
         "capitals": ["--task", "choice", "--data", str(HERE / "data" / "capitals.jsonl")]}
VARIANTS = {"pairs": ["--coef-scheme", "pairs"], "zscore": ["--coef-scheme", "zscore"],
            "pairs-noef": ["--coef-scheme", "pairs", "--no-error-feedback"],
            "zscore-noef": ["--coef-scheme", "zscore", "--no-error-feedback"]}
METRIC = {"sentiment": "balanced_accuracy", "continents": "accuracy", "capitals": "accuracy"}


#: population, batch, sigma and evaluation layout of the sweep; a run at other values has them in
#: its key (eval_batch 1: one prompt a decode, as every run of the sweep so far was made)
STANDARD = {"population": 16, "batch": 24, "sigma": 0.01, "eval_batch": 1}
_ARGS = None  # the parsed arguments, for key()


def key(task, variant, alpha, seed) -> str:
    k = f"{task}|{variant}|{alpha:g}|{seed}"
    other = {n: getattr(_ARGS, n) for n in STANDARD if _ARGS is not None and getattr(_ARGS, n) != STANDARD[n]}
    return k + "".join(f"|{n}={v:g}" for n, v in sorted(other.items()))


@contextmanager
def results(write: bool = True):
    """ab.json, read (and written back) under an flock: two shards write it."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "qes-edge-ab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
        yield data
        if write:
            tmp = OUT.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, OUT)


def run_one(task, variant, alpha, seed, a) -> dict:
    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, "-m", "qes_edge", "train", *TASKS[task], *VARIANTS[variant], "--json",
               "--steps", str(a.steps), "--population", str(a.population), "--batch", str(a.batch),
               "--alpha", str(alpha), "--sigma", str(a.sigma), "--seed", str(seed), "--eval-every", "10",
               "--threads", str(a.threads), "--eval-batch", str(a.eval_batch),
               "--ledger", str(Path(home) / "run.qes")]
        env = {**os.environ, "QES_EDGE_HOME": home, "OMP_WAIT_POLICY": "PASSIVE"}
        outcome = train(cmd, env, key(task, variant, alpha, seed))
    return {"task": task, "variant": variant, "alpha": alpha, "seed": seed, "sigma": a.sigma, "steps": a.steps,
            "population": a.population, "batch": a.batch, "threads": a.threads, "eval_batch": a.eval_batch,
            **outcome}


def train(cmd, env, what: str) -> dict:
    """Run one `qes-edge train --json ... --ledger L` (cmd) and keep what the A/B reports of it:
    held-out by step, codes changed and training reward per step, no-signal steps, minutes."""
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{what}: train failed: {r.stderr.strip()[-2000:]}")
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    steps = [e for e in events if e["event"] == "step"]
    return {"heldout": {e["step"]: {k: v for k, v in e.items() if k not in ("event", "step", "split")}
                        for e in events if e["event"] == "eval"},
            "changed": [s["changed"] for s in steps], "train_reward": [s["reward"] for s in steps],
            "no_signal": [s["step"] for s in steps if s["timings"].get("no_signal")],
            "minutes": round((time.time() - t0) / 60, 1), "date": time.strftime("%Y-%m-%d"),
            "command": "qes-edge " + " ".join(cmd[3:-2])}


def run_calibrated(task, hours, seed, a) -> dict:
    """calibrate for `hours`, then train with its recommendation, both in one fresh home."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "QES_EDGE_HOME": home, "OMP_WAIT_POLICY": "PASSIVE"}
        common = ["--threads", str(a.threads), "--eval-batch", str(a.eval_batch)]
        t0 = time.time()
        cal = subprocess.run([sys.executable, "-m", "qes_edge", "calibrate", *TASKS[task], "--hours", f"{hours:g}",
                              "--seed", str(seed), "--json", *common], capture_output=True, text=True, env=env)
        if cal.returncode != 0:
            raise SystemExit(f"{task} calibrate failed: {cal.stderr.strip()[-2000:]}")
        advice = json.loads(cal.stdout.strip().splitlines()[-1])
        cal_minutes = round((time.time() - t0) / 60, 1)
        rec = advice["recommendation"]
        every = max(1, rec["steps_in_budget"] // 4)
        cmd = [sys.executable, "-m", "qes_edge", "train", *TASKS[task], "--json", "--sigma", f"{rec['sigma']:g}",
               "--alpha", f"{rec['alpha']:g}", "--population", str(rec["population"]), "--batch", str(rec["batch"]),
               "--steps", str(rec["steps_in_budget"]), "--seed", str(seed), "--eval-every", str(every), *common,
               "--ledger", str(Path(home) / "run.qes")]
        outcome = train(cmd, env, f"{task}|calibrated")
    return {"task": task, "variant": "calibrated", "hours": hours, "seed": seed, "sigma": rec["sigma"],
            "alpha": rec["alpha"], "population": rec["population"], "batch": rec["batch"],
            "steps": rec["steps_in_budget"], "threads": a.threads, "eval_batch": a.eval_batch,
            "calibrate": {"command": advice["command"], "reasons": rec["reasons"], "minutes": cal_minutes,
                          "budget_prompts": advice["budget_prompts"],
                          "probes": [{k: p[k] for k in ("sigma", "damage", "spread", "resolution", "agreement")}
                                     for p in advice["probes"]]},
            **outcome}


def table(data, a) -> None:
    print(f"{'task':<11} {'variant':<12} {'alpha':>7} {'seed':>4}  held-out at " +
          " ".join(f"{s:>6}" for s in (0, 10, 20, 40)) + "  reward@40   codes changed per step (median; first 3)")
    for t in a.tasks:
        for v in a.variants:
            for al in a.alphas:
                for s in a.seeds:
                    r = data["runs"].get(key(t, v, al, s))
                    if r is None:
                        print(f"{t:<11} {v:<12} {al:>7g} {s:>4}  (not run)")
                        continue
                    h = r["heldout"]
                    vals = " ".join(f"{h[str(x)][METRIC[t]]:6.3f}" if str(x) in h else f"{'—':>6}"
                                    for x in (0, 10, 20, 40))
                    # the held-out reward beside the metric: on 48 questions accuracy moves by 0.021
                    rew = h.get("40", {}).get("reward")
                    rew = f"{rew:9.3f}" if rew is not None else f"{'—':>9}"
                    ch = sorted(r["changed"])
                    print(f"{t:<11} {v:<12} {al:>7g} {s:>4}  {METRIC[t][:11]:>11} {vals}  {rew}   "
                          f"{ch[len(ch) // 2]:,}; {', '.join(f'{c:,}' for c in r['changed'][:3])}")
    for r in (r for r in data["runs"].values() if r["variant"] == "calibrated" and r["task"] in a.tasks):
        h = r["heldout"]
        marks = sorted(h, key=int)
        print(f"{r['task']:<11} calibrated {r['hours']:g} h, seed {r['seed']}: --sigma {r['sigma']:g} --alpha "
              f"{r['alpha']:g} --population {r['population']} --batch {r['batch']} --steps {r['steps']} "
              f"({r['minutes']} min; calibrate {r['calibrate']['minutes']} min)")
        print(f"{'':<11} held-out {METRIC[r['task']]} at steps " +
              ", ".join(f"{m}: {h[m][METRIC[r['task']]]:.3f}" for m in marks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sentiment,continents,capitals")
    ap.add_argument("--variants", default="pairs,zscore,pairs-noef")
    ap.add_argument("--alphas", default="0.0005,0.001,0.002")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--population", type=int, default=STANDARD["population"])
    ap.add_argument("--batch", type=int, default=STANDARD["batch"])
    ap.add_argument("--sigma", type=float, default=STANDARD["sigma"],
                    help="(with --population and --batch: a run at other values than the sweep's, such as what "
                         "`qes-edge calibrate` recommends, is kept under a key that names them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=STANDARD["eval_batch"],
                    help="prompts per llama.cpp decode (qes-edge train --eval-batch); 1, as the sweep so far")
    ap.add_argument("--calibrated", type=float, metavar="HOURS",
                    help="run calibrate for HOURS and train with its recommendation (per task and seed)")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th of the missing runs, from the I-th")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    a = ap.parse_args(argv)
    global _ARGS
    _ARGS = a
    a.tasks, a.variants = a.tasks.split(","), a.variants.split(",")
    a.alphas, a.seeds = [float(x) for x in a.alphas.split(",")], [int(x) for x in a.seeds.split(",")]
    for t in a.tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}: {', '.join(TASKS)}")
    for v in a.variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: {', '.join(VARIANTS)}")
    if a.list:
        with results(write=False) as data:
            table(data, a)
        return 0
    if a.calibrated:
        for t in a.tasks:
            for s in a.seeds:
                k = f"{t}|calibrated|{a.calibrated:g}h|{s}"
                with results(write=False) as data:
                    if k in data["runs"]:
                        continue
                print(f"{time.strftime('%H:%M')} {k} ...", flush=True)
                r = run_calibrated(t, a.calibrated, s, a)
                with results() as data:
                    data["runs"][k] = r
                print(f"  done: {r['calibrate']['command']}; held-out {r['heldout'].get(r['steps'])}", flush=True)
        return 0
    i, n = (int(x) for x in a.shard.split("/"))
    plan = [(t, v, al, s) for s in a.seeds for t in a.tasks for v in a.variants for al in a.alphas]
    with results(write=False) as data:
        todo = [p for p in plan if key(*p) not in data["runs"]][i::n]
    print(f"{len(todo)} runs to do in this shard ({a.shard})", flush=True)
    for t, v, al, s in todo:
        print(f"{time.strftime('%H:%M')} {key(t, v, al, s)} ...", flush=True)
        r = run_one(t, v, al, s, a)
        with results() as data:
            data["runs"][key(t, v, al, s)] = r
        print(f"  done in {r['minutes']} min: held-out {r['heldout'].get(str(a.steps), r['heldout'].get(a.steps))}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
