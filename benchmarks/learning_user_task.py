"""Learning on a user-style task: a multiple-choice JSONL through the model's chat template.

    python benchmarks/learning_user_task.py [--data benchmarks/data/continents.jsonl] [--seeds 0,1,2]
        [--steps 20] [--population 8] [--batch 10] [--alpha 0.002] [--sigma 0.01]

What a user runs, as a user runs it: `qes-edge train --task choice --data FILE --json` (the
files come from benchmarks/make_geography.py; the prompt goes through SmolLM2's own chat
template; each choice is scored by the mean log-probability of its whole answer), one fresh
process per run seed, each in its own temporary QES_EDGE_HOME.  The held-out questions (the
task's fixed 20% split, never trained on) are scored at the start, halfway and at the end; the
script prints and writes (benchmarks/results/learning_<data>.json) the held-out reward
(p(correct) over the choices) and accuracy per seed, and their means."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "continents.jsonl"


def run(seed: int, a) -> dict:
    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, "-m", "qes_edge", "train", "--task", "choice", "--data", str(a.data), "--json",
               "--steps", str(a.steps), "--population", str(a.population), "--batch", str(a.batch),
               "--alpha", str(a.alpha), "--sigma", str(a.sigma), "--seed", str(seed),
               "--eval-every", str(max(1, a.steps // 2)), "--ledger", str(Path(home) / "run.qes")]
        t0 = time.time()
        env = {**os.environ, "QES_EDGE_HOME": home, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"seed {seed}: qes-edge train failed: {r.stderr.strip()[-2000:]}")
        events = [json.loads(x) for x in r.stdout.splitlines()]
    evals = {e["step"]: {"reward": e["reward"], "accuracy": e["accuracy"]} for e in events if e["event"] == "eval"}
    steps = [e for e in events if e["event"] == "step"]
    overhead = sum(s["timings"]["perturb_s"] + s["timings"]["restore_s"] + s["timings"]["update_s"] for s in steps) / \
        max(1e-9, sum(s["timings"]["eval_s"] for s in steps))
    return {"seed": seed, "evals": evals, "train_reward": [s["reward"] for s in steps], "minutes": (time.time() - t0) / 60,
            "overhead": overhead, "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.002)
    ap.add_argument("--sigma", type=float, default=0.01)
    a = ap.parse_args(argv)
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        res = run(seed, a)
        results.append(res)
        first, last = res["evals"][0], res["evals"][a.steps]
        print(f"seed {seed}: held-out reward {first['reward']:.3f} -> {last['reward']:.3f}, accuracy "
              f"{first['accuracy']:.3f} -> {last['accuracy']:.3f} ({res['minutes']:.1f} min, "
              f"QES overhead {res['overhead']:.1%})", flush=True)
    mean = lambda k, step: sum(r["evals"][step][k] for r in results) / len(results)  # noqa: E731
    summary = {k: {"start": mean(k, 0), "end": mean(k, a.steps)} for k in ("reward", "accuracy")}
    print(f"mean over {len(results)} seeds: reward {summary['reward']['start']:.3f} -> {summary['reward']['end']:.3f}, "
          f"accuracy {summary['accuracy']['start']:.3f} -> {summary['accuracy']['end']:.3f}")
    out = HERE / "results" / f"learning_{a.data.stem}.json"
    out.parent.mkdir(exist_ok=True)
    settings = {**vars(a), "data": str(a.data.relative_to(HERE.parent)) if a.data.is_relative_to(HERE.parent) else str(a.data)}
    out.write_text(json.dumps({"settings": settings, "runs": results, "mean": summary}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
