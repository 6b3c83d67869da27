"""Peak memory of the real commands against plain llama-cpp-python inference of the same model.

Every row is a fresh process, measured from outside: its peak resident set ("Maximum resident
set size" of `/usr/bin/time -v`, or, without it, ru_maxrss of a fresh intermediate process whose
only child is the command), so imports, the model, llama.cpp's buffers and everything the
command does count, as they do for a user.

  inference         a plain llama-cpp-python script: Llama(model, n_ctx, n_threads, verbose=False)
                    with default options otherwise, scoring the prompts of a training step (the
                    step's batch, rendered through the model's chat template as the driver renders
                    them, each evaluated from an empty context, once per member: as many forward
                    passes as the step) for as many steps
  qes-edge train    `qes-edge train --steps S --population P --batch B` (task sentiment, n_ctx as
                    given, --ledger in a temporary folder, QES_EDGE_HOME there too): model checks,
                    load, self-check, held-out evaluation at start and end, the steps
  train (pop 16)    the same with the default population (--full)
  daemon run        `qes-edge queue add <the same options>`, then `qes-edge daemon run
                    --exit-when-empty` (the daemon trains the queued run and exits)
  daemon idle       `qes-edge daemon run` with an empty queue: its resident set after a few
                    seconds (psutil), not a peak
  torch-bf16/fp32   one full-parameter AdamW step of the same architecture in PyTorch on the CPU
                    (weights dequantized from the GGUF, torch_llama.py), when torch is installed

The daemon rows are skipped, with a note, where `qes-edge daemon --help` fails.

    python benchmarks/bench_memory.py [--n-ctx 512] [--steps 2] [--population 4] [--batch 8] [--full]

Prints the table with ratios to inference and writes benchmarks/results/memory.json."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# the plain inference script: llama-cpp-python and nothing of qes-edge (its prompts come as text)
INFERENCE = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
model, n_ctx, n_threads, prompts_file, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
job = json.load(open(prompts_file))
llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
ids = [llm.tokenize(t.encode(), add_bos=False)[0] for t in job["choice_texts"]]
scores = []
for _ in range(repeat):                      # one pass over the batch per member, per step
    for text in job["prompts"]:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(tokens)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        x = logits[ids].astype(np.float64)
        p = np.exp(x - x.max())
        scores.append(float(p[0] / p.sum()))
print(json.dumps({"forward_passes": len(scores), "mean_score": sum(scores) / len(scores)}))
"""


def time_binary() -> str | None:
    p = shutil.which("time", path="/usr/bin:/bin") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if p is None:
        return None
    r = subprocess.run([p, "-v", "true"], capture_output=True, text=True)
    return p if r.returncode == 0 and "Maximum resident set size" in r.stderr else None


# a PyTorch AdamW step of the same architecture (torch_llama.py), for scale
TORCH = r"""
import sys, torch
from torch_llama import adamw_step
print(adamw_step(int(sys.argv[1]), getattr(torch, sys.argv[2]), lambda: 0.0))
"""


# a fresh intermediate process whose only child is the command: its RUSAGE_CHILDREN peak is the command's
_RUSAGE_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                   "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                   "sys.exit(rc)")


def measure(cmd: list[str], env: dict, cwd: Path, timeout: float = 3600) -> dict:
    """Run cmd in a fresh process; its peak RSS in MB (1 MB = 2^20 bytes, as /usr/bin/time's kB are KiB),
    wall seconds, exit code and output."""
    tb = time_binary()
    wrapped = [tb, "-v", *cmd] if tb else [sys.executable, "-c", _RUSAGE_WRAPPER, *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(wrapped, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    kb = None
    for line in p.stderr.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size"):
            kb = int(line.rsplit(":", 1)[1])
        elif line.startswith("MAXRSS_KB"):
            kb = int(line.split()[1])
    if kb is None:
        raise SystemExit(f"no peak RSS for {' '.join(cmd)} (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return {"peak_rss_mb": kb / 1024, "wall_s": round(wall, 1), "rc": p.returncode, "stdout": p.stdout,
            "stderr": p.stderr, "method": "/usr/bin/time -v" if tb else "getrusage(RUSAGE_CHILDREN)"}


def base_env(home: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["QES_EDGE_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def qes(*args) -> list[str]:
    return [sys.executable, "-m", "qes_edge", *map(str, args)]


def step_prompts(model: Path, batch: int, seed: int, raw: bool = False) -> dict:
    """The texts of training step 0's batch of the sentiment task, rendered as the driver renders
    them (the model's chat template, with the vocabulary's BOS/EOS texts, then the prefill; raw:
    the plain text --raw-prompt gives), and the texts of the answer tokens the task scores."""
    from qes_edge.llama.chat import load_template
    from qes_edge.tasks.sentiment import CLASSES, SentimentTask
    task = SentimentTask(seed=seed, raw_prompt=raw)
    train = list(task.train_examples())
    try:
        from qes_edge.training.derive import batch_indices
        idx = [int(i) for i in batch_indices(seed, 0, len(train), batch, task.strata())]
    except Exception:  # the derivation's signature moved: the first examples serve as well
        idx = list(range(min(batch, len(train))))
    if raw:
        prompts = [train[i].prompt for i in idx]
    else:
        chat = load_template(model)  # gguf's reader for the BOS/EOS texts: this process only
        prompts = [chat.render(train[i].chat()) + train[i].prefill for i in idx]
    return {"prompts": prompts, "choice_texts": [v[0] for v in CLASSES.values()]}


def daemon_available(env: dict, cwd: Path) -> bool:
    r = subprocess.run(qes("daemon", "--help"), env=env, cwd=cwd, capture_output=True, text=True)
    return r.returncode == 0


def daemon_idle(env: dict, cwd: Path, wait_s: float) -> dict:
    """RSS of `qes-edge daemon run` with an empty queue after wait_s seconds (psutil)."""
    import psutil
    p = subprocess.Popen(qes("daemon", "run", "--poll", "1"), env=env, cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc = psutil.Process(p.pid)
        samples = []
        t_end = time.monotonic() + wait_s
        while time.monotonic() < t_end and p.poll() is None:
            try:
                samples.append(proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        if p.poll() is not None:
            out, err = p.communicate()
            raise RuntimeError(f"daemon run exited ({p.returncode}) with an empty queue:\n{err[-2000:]}")
        rss = proc.memory_info().rss
        hwm = None
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        except OSError:
            pass
        return {"idle_rss_mb": rss / 2**20, "peak_rss_mb": hwm, "after_s": wait_s,
                "max_sampled_mb": max(samples) / 2**20 if samples else None}
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="any name --model takes (default: the default model), e.g. "
                                                  "pypi:gemma3-270m")
    ap.add_argument("--raw-prompt", action="store_true", help="prompts as plain text (a base model without a "
                                                               "chat template)")
    ap.add_argument("--eval-batch", type=int, default=None, help="train's --eval-batch (default: train's own)")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="training steps of the train and daemon rows")
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="0: the product's default (every core it may use)")
    ap.add_argument("--full", action="store_true", help="also train with the default population 16")
    ap.add_argument("--idle-wait", type=float, default=8.0, help="seconds before the daemon's idle RSS is read")
    ap.add_argument("--no-daemon", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows even where torch is installed")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from qes_edge.gguf.models import resolve_model
    from qes_edge.threads import resolve_threads
    model = resolve_model(a.model)
    threads = resolve_threads(a.threads)
    train_opts = ["--model", model, "--task", "sentiment", "--steps", a.steps, "--population", a.population,
                  "--batch", a.batch, "--seed", a.seed, "--n-ctx", a.n_ctx, "--threads", a.threads] \
        + (["--raw-prompt"] if a.raw_prompt else []) + (["--eval-batch", a.eval_batch] if a.eval_batch else [])
    rows: dict[str, dict] = {}
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="qes-bench-memory-") as tmp:
        tmp = Path(tmp)

        def fresh(name: str) -> tuple[Path, dict]:
            d = tmp / name
            d.mkdir()
            return d, base_env(d / "home")

        # 1. the inference baseline
        d, env = fresh("inference")
        job = step_prompts(model, a.batch, a.seed, a.raw_prompt)
        (d / "prompts.json").write_text(json.dumps(job))
        repeat = a.steps * a.population
        r = measure([sys.executable, "-c", INFERENCE, str(model), str(a.n_ctx), str(threads),
                     str(d / "prompts.json"), str(repeat)], env, d)
        if r["rc"]:
            raise SystemExit(f"the inference baseline failed:\n{r['stderr'][-3000:]}")
        rows["inference"] = {"peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"], **json.loads(r["stdout"]),
                             "command": "python -c <plain llama-cpp-python script> (see INFERENCE)"}
        method = r["method"]
        print(f"inference: {r['peak_rss_mb']:.1f} MB ({rows['inference']['forward_passes']} forward passes, "
              f"{r['wall_s']} s)", flush=True)

        # 2. qes-edge train, as a user runs it
        variants = [("qes-edge train", a.population)]
        if a.full:
            variants.append(("qes-edge train (pop 16)", 16))
        for name, pop in variants:
            d, env = fresh(name.replace(" ", "_").replace("(", "").replace(")", ""))
            opts = list(train_opts)
            opts[opts.index("--population") + 1] = pop
            cmd = qes("train", *opts, "--ledger", d / "run.qes")
            r = measure(cmd, env, d)
            if r["rc"]:
                raise SystemExit(f"{name} failed:\n{r['stderr'][-3000:]}")
            rows[name] = {"peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
                          "command": "qes-edge " + " ".join(map(str, cmd[3:]))}
            print(f"{name}: {r['peak_rss_mb']:.1f} MB ({r['wall_s']} s)", flush=True)

        # 3. the daemon: a queued run, then idle
        d, env = fresh("daemon")
        if a.no_daemon:
            notes.append("daemon rows skipped (--no-daemon)")
        elif not daemon_available(env, d):
            notes.append("daemon rows skipped: `qes-edge daemon --help` fails (no daemon in this build)")
        else:
            add = subprocess.run(qes("queue", "add", *train_opts, "--ledger", d / "run.qes"), env=env, cwd=d,
                                 capture_output=True, text=True)
            if add.returncode:
                notes.append(f"daemon run skipped: `qes-edge queue add` failed: {add.stderr.strip()[-500:]}")
            else:
                cmd = qes("daemon", "run", "--exit-when-empty", "--threads", a.threads)
                r = measure(cmd, env, d)
                if r["rc"]:
                    notes.append(f"daemon run exited {r['rc']}: {r['stderr'].strip()[-500:]}")
                else:
                    rows["qes-edge daemon run"] = {"peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
                                                   "command": "qes-edge queue add <the train options>; qes-edge "
                                                              + " ".join(map(str, cmd[3:]))}
                    print(f"daemon run: {r['peak_rss_mb']:.1f} MB ({r['wall_s']} s)", flush=True)
            d, env = fresh("daemon_idle")
            try:
                idle = daemon_idle(env, d, a.idle_wait)
                rows["qes-edge daemon (idle)"] = {"peak_rss_mb": idle["peak_rss_mb"], "idle_rss_mb": idle["idle_rss_mb"],
                                                  "after_s": idle["after_s"], "method": "psutil RSS",
                                                  "command": "qes-edge daemon run --poll 1 (empty queue)"}
                print(f"daemon idle: {idle['idle_rss_mb']:.1f} MB after {a.idle_wait:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - reported, the other rows stand
                notes.append(f"daemon idle skipped: {e}")

        # 4. PyTorch, for scale
        have_torch = importlib.util.find_spec("torch") is not None
        if not have_torch:
            notes.append("torch is not installed: PyTorch AdamW rows skipped (pip install torch==2.13.0)")
        for dtype in ("bfloat16", "float32") if have_torch and not a.no_torch else ():
            d, env = fresh(f"torch_{dtype}")
            env["PYTHONPATH"] = str(HERE) + os.pathsep + env["PYTHONPATH"]
            r = measure([sys.executable, "-c", TORCH, str(a.n_ctx), dtype], env, d)
            if r["rc"]:
                notes.append(f"torch {dtype} failed: {r['stderr'].strip()[-300:]}")
                continue
            name = "torch-bf16 AdamW step" if dtype == "bfloat16" else "torch-fp32 AdamW step"
            rows[name] = {"peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
                          "command": f"python -c <torch_llama.adamw_step({a.n_ctx}, torch.{dtype})>"}
            print(f"{name}: {r['peak_rss_mb']:.1f} MB", flush=True)

    base = rows["inference"]["peak_rss_mb"]
    print(f"\npeak resident memory, {model.name}, n_ctx {a.n_ctx}, {threads} threads, "
          f"steps {a.steps} x population {a.population} x batch {a.batch} ({method}):")
    print(f"  {'process':<26} {'peak RSS MB':>11}  {'ratio':>6}")
    for name, r in rows.items():
        if name == "qes-edge daemon (idle)":
            print(f"  {name:<26} {r['idle_rss_mb']:11.1f}  {r['idle_rss_mb'] / base:5.2f}x   (RSS after "
                  f"{r['after_s']:.0f} s idle, not a peak)")
        else:
            print(f"  {name:<26} {r['peak_rss_mb']:11.1f}  {r['peak_rss_mb'] / base:5.2f}x")
    for n in notes:
        print(f"  note: {n}")
    ratios = {name: (r["idle_rss_mb"] if "idle_rss_mb" in r else r["peak_rss_mb"]) / base for name, r in rows.items()}
    out = {"model": model.name, "n_ctx": a.n_ctx, "threads": threads, "steps": a.steps, "population": a.population,
           "batch": a.batch, "method": method, "mb": "2^20 bytes", "results": rows, "ratios": ratios, "notes": notes,
           "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
