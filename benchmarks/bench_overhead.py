"""What QES adds on top of inference, per training step, on the real model.

Runs a few real training steps (sentiment task, SmolLM2-135M Q4_1) and prints, per step, the
time of the members' forward passes against perturb + restore + update, and the ratio.  The
update replays a full window: the trainer's history is pre-filled with K synthetic steps
(random seeds and coefficients, the shapes a K-step-old run would have), so the replay cost is
the steady-state one from the first step.

    python benchmarks/bench_overhead.py [--population 30] [--batch 24] [--window 50] [--steps 3]

Writes benchmarks/results/overhead.json."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qes_edge.native.engine import random_steps
from qes_edge.ledger.store import StepRecord
from qes_edge.training.session import Session, SessionOptions
from qes_edge.training.config import TrainConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    a = ap.parse_args(argv)
    cfg = TrainConfig(task="sentiment", population=a.population, batch=a.batch, window=a.window, n_ctx=256)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d, \
            Session.open(SessionOptions(cfg, ledger=Path(d) / "o.qes")) as session:  # the default model
        tr, lg = session.trainer, session.ledger
        # steady state: a full window to replay
        for k, st in enumerate(random_steps(rng, a.window, a.population, cfg.sigma, cfg.alpha)):
            tr.history.append(StepRecord(k - a.window, st.threshold, st.seeds, st.coefs_q16, np.zeros(a.population), ""))
        hist = tr.history
        for s in range(a.steps):
            tr.replica.history = hist[-a.window:]
            t0 = time.perf_counter()
            rec = _step(tr, lg)
            t = rec.timings
            qes = t["perturb_s"] + t["restore_s"] + t["update_s"]
            rows.append({**t, "qes_s": qes, "ratio": qes / t["eval_s"], "wall_s": time.perf_counter() - t0})
            print(f"step {s}: inference {t['eval_s']:.2f} s | perturb {t['perturb_s']:.2f} + restore {t['restore_s']:.2f} "
                  f"+ update {t['update_s']:.2f} = {qes:.2f} s | overhead {qes / t['eval_s']:.1%}", flush=True)
    mean = float(np.mean([r["ratio"] for r in rows]))
    print(f"mean overhead over inference: {mean:.1%} (population {a.population}, batch {a.batch}, K={a.window})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"population": a.population, "batch": a.batch, "window": a.window, "rows": rows,
                                 "mean_ratio": mean, "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")


def _step(tr, lg):
    """Trainer.step without the ledger's step numbering (the history is synthetic)."""
    n = len(tr.history)
    real_append = lg.append_step
    lg.append_step = lambda run_id, rec: rec
    try:
        return tr.step()
    finally:
        lg.append_step = real_append
        assert len(tr.history) == n + 1


if __name__ == "__main__":
    main()
