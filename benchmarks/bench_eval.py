"""Steps per hour on the CPU: a member's batch one prompt a decode against many (llama/batched.py).

Part 1, in this process, on one ModelDriver (the real model, --threads):
  for sentiment (logits), choice (benchmarks/data/continents.jsonl: five choices, one of two
  tokens) and countdown (greedy generation of --max-tokens), one member's batch of --batch
  prompts scored with --eval-batch 1 (one at a time, today's path for old runs) and with each
  layout of --layouts; median of --repeats.  Scoring's tokens per second are set against
  llama.cpp's own throughput on as many tokens decoded as one sequence in n_batch decodes (the
  physical limit here); generation's against one create_completion per prompt (a plain
  llama-cpp-python loop).
Part 2, fresh processes measured from outside (peak RSS from /usr/bin/time -v):
  `qes-edge train --task sentiment --steps 2 --population 4 --batch B --eval-batch N --json`
  for N = 1 and the default, their seconds per step (the steps' own timings), against plain
  inference of the same batch: a script that loads the model as llama-cpp-python does (no
  libqes, no ledger) and decodes the same prompts in the same layout and KV cache.

    python benchmarks/bench_eval.py [--threads 2] [--batch 24] [--layouts 8,24]

Prints both tables and writes benchmarks/results/eval.json."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _limit_seconds(driver, n_tokens, repeats):
    """llama.cpp's own time for n_tokens as one sequence, in decodes of n_batch tokens."""
    from qes_edge.llama import batched as B
    seq = (driver.tokenize("The quick brown fox jumps over the lazy dog. " * 8) * (n_tokens // 80 + 2))[:n_tokens]
    batch = B.SeqBatch(512, 1)

    def run():
        B.clear_memory(driver.llm)
        for a in range(0, n_tokens, 512):
            piece = [B._Token(t, a + k, (0,), None) for k, t in enumerate(seq[a:a + 512])]
            piece[-1].out = ("prompt", 0)
            batch.fill(piece)
            B.decode(driver.llm, batch)
    try:
        return _median_time(run, repeats)
    finally:
        batch.close()
        B.clear_memory(driver.llm)


def part1(args, model):
    from qes_edge.llama import batched as B
    from qes_edge.llama.driver import ModelDriver
    from qes_edge.tasks.countdown import CountdownTask
    from qes_edge.tasks.jsonl import ChoiceTask
    from qes_edge.tasks.sentiment import SentimentTask
    driver = ModelDriver(model, n_ctx=512, n_threads=args.threads)
    tasks = {"sentiment": SentimentTask(), "choice": ChoiceTask(ROOT / "benchmarks/data/continents.jsonl"),
             "countdown": CountdownTask(max_tokens=args.max_tokens)}
    rows = []
    for name, task in tasks.items():
        ex = list(task.train_examples())[:args.batch]
        prompts = [driver.prompt_tokens(e) for e in ex]
        conts = [[task.tokens_of(driver, c) for c in e.meta["choices"]] for e in ex] if name == "choice" else [[]] * len(ex)
        branches = [[c[:-1] for c in cs if len(c) > 1] for cs in conts]
        n_tok = len(B.round_tokens(prompts, branches, list(range(len(prompts)))))
        gen = name == "countdown"
        for n in [1] + args.layouts:
            lay = B.EvalLayout(sequences=n, seqs_per_prompt=1 + task.branches_per_prompt())  # as training lays it out
            driver.use_layout(lay, ex, generated=task.generated_tokens())
            if gen:
                outs = []
                s = _median_time(lambda: outs.append(driver.generate_many(prompts, args.max_tokens)), args.repeats)
                made = sum(len(driver.tokenize(t, add_bos=False, special=False)) for t in outs[-1])
                rows.append({"task": name, "eval_batch": n, "seconds": s, "generated_tokens": made,
                             "tokens_per_s": made / s, "kv_cells": driver.kv_cells, "kv_mib": driver.kv_bytes / 2**20})
            else:
                s = _median_time(lambda: list(driver.score(ex, (lambda i: conts[i]) if name == "choice" else None)),
                                 args.repeats)
                rows.append({"task": name, "eval_batch": n, "seconds": s, "tokens": n_tok, "tokens_per_s": n_tok / s,
                             "kv_cells": driver.kv_cells, "kv_mib": driver.kv_bytes / 2**20})
        if not gen:  # on the last layout's cache, which holds all the batch's tokens
            lim = _limit_seconds(driver, n_tok, args.repeats)
            for r in rows:
                if r["task"] == name:
                    r["limit_tokens_per_s"] = n_tok / lim
                    r["of_limit"] = lim / r["seconds"]
    driver.use_layout(B.EvalLayout())
    return rows


INFERENCE = r"""
import json, sys, time
from qes_edge.llama.runtime import load_llama
from qes_edge.llama import batched as B
spec = json.load(open(sys.argv[1]))
llm = load_llama(spec["model"], n_ctx=512, n_threads=spec["threads"])
lay = B.EvalLayout(sequences=spec["eval_batch"], seqs_per_prompt=1)  # sentiment: no branches, as training
if lay.batched:
    B.resize_context(llm, spec["cells"], lay)
    for _ in range(spec["passes"]):
        list(B.run_rounds(llm, lay, spec["prompts"], [[] for _ in spec["prompts"]], spec["cells"]))
else:
    from qes_edge.llama.runtime import forward
    for _ in range(spec["passes"]):
        for p in spec["prompts"]:
            forward(llm, p)
"""


def _run(cmd, env):
    """(stdout, stderr, peak RSS MiB, wall s) of cmd in a fresh process, measured from outside
    (bench_memory.measure: /usr/bin/time -v; a child forked from this process would start
    with this process's resident set as its peak)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import measure
    m = measure(cmd, env, ROOT)
    if m["rc"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{m['stderr'][-2000:]}")
    return m["stdout"], m["stderr"], m["peak_rss_mb"], m["wall_s"]


def part2(args, model):
    from qes_edge.llama.driver import ModelDriver
    from qes_edge.tasks.sentiment import SentimentTask
    rows = []
    driver = ModelDriver(model, n_ctx=512, n_threads=1, self_check=False)
    task = SentimentTask()
    prompts = [driver.prompt_tokens(e) for e in list(task.train_examples())[:args.batch]]
    del driver
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with tempfile.TemporaryDirectory() as tmp:
        env["QES_EDGE_HOME"] = tmp
        for n in (1, args.default):
            cmd = [sys.executable, "-m", "qes_edge", "train", "--task", "sentiment", "--steps", "2", "--population", "4",
                   "--batch", str(args.batch), "--eval-batch", str(n), "--threads", str(args.threads), "--json",
                   "--ledger", f"{tmp}/e{n}.qes", "--model", str(model)]
            out, err, rss, wall = _run(cmd, env)
            steps = [json.loads(l) for l in out.splitlines() if l.startswith("{") and '"event": "step"' in l]
            step_s = statistics.median(sum(v for k, v in s["timings"].items() if k.endswith("_s")) for s in steps)
            m = re.search(r"KV cache (\d+) tokens", err)
            cells = int(m.group(1)) if m else 512
            spec = {"model": str(model), "threads": args.threads, "eval_batch": n, "cells": cells, "prompts": prompts,
                    "passes": 2 * 4}
            sp = Path(tmp) / "spec.json"
            sp.write_text(json.dumps(spec))
            _, _, base, _ = _run([sys.executable, "-c", INFERENCE, str(sp)], env)
            rows.append({"eval_batch": n, "train_peak_mib": rss, "inference_peak_mib": base, "ratio": rss / base,
                         "step_s": step_s, "kv_cells": cells, "wall_s": wall})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--layouts", default="8,24")
    ap.add_argument("--default", type=int, default=None, help="the default eval batch (TrainConfig's)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="part1 or part2")
    args = ap.parse_args()
    args.layouts = [int(x) for x in args.layouts.split(",") if x]
    from qes_edge.gguf.models import default_model_path
    from qes_edge.training.config import TrainConfig
    args.default = args.default or 8  # the generation tasks' default (TrainConfig: by task)
    model = default_model_path()
    res = {"threads": args.threads, "batch": args.batch, "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])}
    if "part1" not in args.skip:
        res["throughput"] = part1(args, model)
        print(f"{'task':10} {'eval-batch':>10} {'s/member':>9} {'tok/s':>8} {'of limit':>9} {'speed-up':>9} {'KV MiB':>7}")
        for r in res["throughput"]:
            one = next(x for x in res["throughput"] if x["task"] == r["task"] and x["eval_batch"] == 1)
            lim = f"{r['of_limit']:.2f}" if "of_limit" in r else "-"
            print(f"{r['task']:10} {r['eval_batch']:>10} {r['seconds']:>9.2f} {r['tokens_per_s']:>8.0f} {lim:>9} "
                  f"{one['seconds'] / r['seconds']:>8.2f}x {r['kv_mib']:>7.1f}")
    if "part2" not in args.skip:
        res["memory"] = part2(args, model)
        print(f"{'eval-batch':>10} {'train MiB':>10} {'inference MiB':>14} {'ratio':>6} {'s/step':>7} {'KV cells':>9}")
        for r in res["memory"]:
            print(f"{r['eval_batch']:>10} {r['train_peak_mib']:>10.1f} {r['inference_peak_mib']:>14.1f} "
                  f"{r['ratio']:>6.2f} {r['step_s']:>7.1f} {r['kv_cells']:>9}")
    out = ROOT / "benchmarks" / "results" / "eval.json"
    if args.skip and out.exists():  # the part not run keeps its last figures
        res = {**json.loads(out.read_text()), **res}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
