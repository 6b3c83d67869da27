"""Follow mode's cost on the real model: a step's replay on the follower against that step's
training time (goal: replay ≤ 5% of training).

1. `qes-edge train` records a few real steps (SmolLM2-135M Q4_1, sentiment task, population 16,
   batch 16, K=50) into a ledger; their recorded timings are the training time of each step
   (perturb + eval + restore + update + digest).
2. A read-only sync server (what `daemon run --serve` runs) offers that ledger over loopback TCP
   and `follow` (the code behind `qes-edge follow --once`) syncs it, replays every step onto the
   base model's codes (each weights hash checked) and writes the GGUF; the bytes are compared
   with `qes-edge replay`'s.  Per step: replay time / training time.
3. Steady state: a run this short replays a window of 1..S steps; at step ≥ K the update (in
   training and in replay alike) replays K = 50 steps.  The follower's update of one step with
   a full synthetic window of K steps is timed on the same codes, and set against the real
   steps' non-update training time plus that same full-window update.

    python benchmarks/bench_follow.py [--steps 3] [--population 16] [--batch 16] [--window 50]
                                      [--threads 0] [--reps 3]

Writes benchmarks/results/follow.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from qes_edge.native.engine import digest_tensors, random_steps
from qes_edge.ledger.store import StepRecord
from qes_edge.sync import Listener, Options, serve
from qes_edge.training.follow import TRAIN_PARTS, follow

ROOT = Path(__file__).resolve().parent.parent


def qes(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "qes_edge", *map(str, args)], capture_output=True, text=True,
                          env=env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "follow.json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        r = qes("train", "--task", "sentiment", "--population", a.population, "--batch", a.batch, "--window",
                a.window, "--steps", a.steps, "--n-ctx", 256, "--threads", a.threads, "--ledger", d / "t.qes")
        if r.returncode:
            sys.exit(f"train failed: {r.stderr[-2000:]}")
        print(f"trained {a.steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)

        listener = Listener("socket://127.0.0.1:0")
        stop = threading.Event()
        srv = threading.Thread(target=serve, args=(listener, d / "t.qes", None, Options()),
                               kwargs={"stop": stop.is_set, "readonly": True}, daemon=True)
        srv.start()
        batches = []
        try:
            t0 = time.perf_counter()
            f = follow(listener.url, d / "f.qes", d / "f.gguf", once=True, threads=a.threads,
                       on_batch=batches.append)
            follow_wall = time.perf_counter() - t0
        finally:
            stop.set()
            srv.join(10)
            listener.close()
        rows = []
        for st, rec in zip(f.times, f.replica.history):
            parts = {k: rec.timings.get(k) for k in TRAIN_PARTS}
            rows.append({**st.to_json(), **parts})
            print(f"step {st.step}: replay {st.replay_s:.3f} s | training {st.train_s:.2f} s (eval "
                  f"{parts['eval_s']:.2f} s, update {parts['update_s']:.2f} s) | {100 * st.ratio:.2f}%", flush=True)
        r = qes("replay", "--ledger", d / "t.qes", "--out", d / "r.gguf", "--threads", a.threads)
        equal = r.returncode == 0 and (d / "f.gguf").read_bytes() == (d / "r.gguf").read_bytes()
        print(f"followed GGUF equals qes-edge replay's byte for byte: {equal}", flush=True)

        # steady state: one step's update with a full window of K synthetic steps, on the same codes
        rng = np.random.default_rng(0)
        cfg = f.replica.cfg
        synth = [StepRecord(k - a.window, s.threshold, s.seeds, s.coefs_q16, np.zeros(a.population), "")
                 for k, s in enumerate(random_steps(rng, a.window + a.reps, a.population, cfg.sigma, cfg.alpha))]
        full = []
        for i in range(a.reps):
            t0 = time.perf_counter()
            f.replica.state.apply(f.tensors, synth[i:i + a.window], synth[i + a.window], a.threads)
            digest_tensors(f.tensors)
            full.append(time.perf_counter() - t0)
        replay_k = float(np.median(full))
        non_update = float(np.mean([sum(r_[k] for k in TRAIN_PARTS if k != "update_s") for r_ in rows]))
        train_k = non_update + replay_k - float(np.mean([r_["digest_s"] for r_ in rows]))  # + the same update
        steady = replay_k / train_k
    real = sum(r_["replay_s"] for r_ in rows) / sum(r_["train_s"] for r_ in rows)
    print(f"real steps: replay {100 * real:.2f}% of training (worst step {100 * max(r_['ratio'] for r_ in rows):.2f}%)")
    print(f"steady state (K={a.window}): replay of a step {replay_k:.3f} s (update + weights hash) vs training "
          f"{train_k:.2f} s (non-update {non_update:.2f} s + the same update): {100 * steady:.2f}%")
    out = {"population": a.population, "batch": a.batch, "window": a.window, "steps": a.steps,
           "threads": a.threads or os.cpu_count(), "task": "sentiment", "n_ctx": 256, "rows": rows,
           "real_ratio": round(real, 5), "follow_wall_s": round(follow_wall, 3),
           "write_s": [round(b.write_s, 3) for b in batches], "bytes_equal_replay": equal,
           "steady_full_window_replay_s": [round(x, 4) for x in full], "steady_replay_s": round(replay_k, 4),
           "steady_train_s": round(train_k, 3), "steady_ratio": round(steady, 5), "goal_ratio": 0.05,
           "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
