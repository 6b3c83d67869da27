"""Proof of learning: QES with error feedback against the same loop without it (QuZO-style),
on the sentiment task, over several run seeds; held-out accuracy before, during and after.

    python benchmarks/learning.py [--steps 50] [--seeds 0 1 2] [--variants ef noef]
                                  [--alpha-ef A] [--alpha-noef A] [--append] [--plot-only]

Writes benchmarks/results/learning.json and learning.png (the ledgers go to
benchmarks/results/ledgers/, not committed).  Why this task: see qes_edge/tasks/sentiment.py."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qes_edge.training.session import Session, SessionOptions
from qes_edge.training.config import TrainConfig

RESULTS = Path(__file__).parent / "results"


def run_one(driver, cfg: TrainConfig, steps: int, eval_every: int, ledger_path: Path) -> tuple[dict, object, int]:
    """One run on a fresh ledger, through a Session; `driver` (None: the session loads the default
    model) is reused across runs and left at the base model's codes.  Returns (result, driver,
    number of held-out examples)."""
    for suffix in ("", "-wal", "-shm"):  # a fresh ledger: an old one would be resumed
        Path(str(ledger_path) + suffix).unlink(missing_ok=True)
    session = Session.open(SessionOptions(cfg, ledger=ledger_path), driver=driver)
    driver, task = session.driver, session.task
    base = [t.codes() for t in driver.tensors]
    curve, rewards, timings = [], [], []
    t0 = time.time()

    def on_step(rec):
        rewards.append(float(np.nanmean(rec.rewards)))
        timings.append(rec.timings)

    def on_eval(step, m, error, split="heldout"):
        nonlocal t0
        if m is None:
            raise SystemExit(f"step {step}: held-out evaluation failed: {error}")
        curve.append({"step": step, **m})
        if step == 0:
            t0 = time.time()  # the run's seconds count from after the step-0 evaluation
            return
        c = curve[-1]
        print(f"  step {step}: train reward {rewards[-1]:.3f}  held-out balanced accuracy "
              f"{c['balanced_accuracy']:.3f} (pos {c['accuracy_positive']:.2f} neg {c['accuracy_negative']:.2f}) "
              f"AUROC {c['auroc']:.3f} p {c['reward']:.3f}  ({time.time() - t0:.0f} s)", flush=True)

    try:
        stopped = session.train(steps, eval_every=eval_every, on_step=on_step, on_eval=on_eval)
        if stopped != "done":
            raise SystemExit(f"the run stopped at step {session.step}: {stopped}")
        changed = sum(int((t.codes() != b).sum()) for t, b in zip(driver.tensors, base))
    finally:
        for t, b in zip(driver.tensors, base):  # back to the base model for the next run
            t.set_codes(b)
        session.close()
    ev = sum(x["eval_s"] for x in timings)
    ov = sum(x["perturb_s"] + x["restore_s"] + x["update_s"] for x in timings)
    return {"curve": curve, "train_reward": rewards, "codes_changed": changed,
            "codes_changed_fraction": changed / driver.n_codes, "seconds": time.time() - t0,
            "eval_s": ev, "overhead_s": ov, "overhead_ratio": ov / ev}, driver, len(task.heldout_examples())


def group(r) -> str:
    return f"{r['variant']}, alpha {r['alpha']:g}"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = sorted({group(r) for r in result["runs"]})
    palettes = {"error feedback": ["tab:blue", "tab:purple", "tab:cyan"], "no error feedback": ["tab:orange", "tab:red"]}
    colors = {}  # blues for error feedback, oranges without it, one shade per alpha
    for variant, pal in palettes.items():
        for i, g in enumerate(g for g in groups if g.startswith(variant + ",")):
            colors[g] = pal[i % len(pal)]
    styles = ["o-", "s--", "^:", "d-."]
    seeds = sorted({r["seed"] for r in result["runs"]})
    for r in result["runs"]:
        c, st = colors[group(r)], styles[seeds.index(r["seed"]) % len(styles)]
        steps = [p["step"] for p in r["curve"]]
        ax[0].plot(steps, [p["balanced_accuracy"] for p in r["curve"]], st, color=c, alpha=0.7,
                   label=f"{group(r)} (seed {r['seed']})")
        ax[1].plot(steps, [p["auroc"] for p in r["curve"]], st, color=c, alpha=0.7)
        ax[2].plot(np.arange(1, len(r["train_reward"]) + 1), r["train_reward"], color=c, alpha=0.5)
    ax[0].set(xlabel="step", ylabel=f"held-out balanced accuracy ({result['heldout']} words)",
              title="SmolLM2-135M Q4_1, sentiment")
    ax[1].set(xlabel="step", ylabel="held-out AUROC of p(positive)", title="discrimination (prior-free)")
    ax[2].set(xlabel="step", ylabel="mean member reward (p correct)", title="training reward")
    ax[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(runs):
    for g in sorted({group(r) for r in runs}):
        rs = [r for r in runs if group(r) == g]
        for metric in ("balanced_accuracy", "auroc", "reward"):
            before = rs[0]["curve"][0][metric]
            after = [round(r["curve"][-1][metric], 3) for r in rs]
            print(f"{g}: held-out {metric} {before:.3f} -> mean {np.mean(after):.3f} "
                  f"(seeds {[r['seed'] for r in rs]}: {after})")
        print(f"{g}: overhead {np.mean([r['overhead_ratio'] for r in rs]):.1%} of eval time")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--variants", nargs="+", choices=["ef", "noef"], default=["ef", "noef"])
    ap.add_argument("--alpha-ef", type=float, default=0.001)
    ap.add_argument("--alpha-noef", type=float, default=0.00125)
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in learning.json (same steps, population and batch)")
    ap.add_argument("--plot-only", action="store_true", help="redraw learning.png from learning.json")
    a = ap.parse_args(argv)
    out = RESULTS / "learning.json"
    if a.plot_only:
        result = json.loads(out.read_text())
        plot(result, RESULTS / "learning.png")
        summary(result["runs"])
        return
    runs = []
    if a.append and out.exists():
        old = json.loads(out.read_text())
        if (old["steps"], old["population"], old["batch"]) != (a.steps, a.population, a.batch):
            raise SystemExit("--append: learning.json holds runs of other settings")
        runs = old["runs"]
    driver = None  # loaded by the first run's session, then shared by every run
    (RESULTS / "ledgers").mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for v in a.variants:
            ef = v == "ef"
            variant = "error feedback" if ef else "no error feedback"
            cfg = TrainConfig(task="sentiment", population=a.population, batch=a.batch, sigma=0.01,
                              alpha=a.alpha_ef if ef else a.alpha_noef, error_feedback=ef, seed=seed, n_ctx=256)
            print(f"seed {seed}, {variant}, alpha {cfg.alpha}", flush=True)
            r, driver, n_heldout = run_one(driver, cfg, a.steps, a.eval_every,
                                           RESULTS / "ledgers" / f"sentiment-s{seed}-{v}-a{cfg.alpha:g}.qes")
            runs = [x for x in runs if (x["seed"], x["variant"], x["alpha"]) != (seed, variant, cfg.alpha)]
            runs.append({"seed": seed, "variant": variant, "alpha": cfg.alpha, **r})
            result = {"task": "sentiment", "model": driver.path.name, "steps": a.steps, "population": a.population,
                      "batch": a.batch, "balanced_batches": cfg.balance, "sigma": 0.01,
                      "heldout": n_heldout, "runs": runs, "date": time.strftime("%Y-%m-%d")}
            out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "learning.png")
    summary(runs)


if __name__ == "__main__":
    main()
