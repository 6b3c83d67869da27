"""Peak memory of QES training against inference of the same model, side by side, in one run.

Each mode runs in its own fresh process and reports its peak resident set (VmHWM):
  inference   llama.cpp through llama-cpp-python, loaded as qes-edge loads it, scoring a batch
              of the sentiment task's prompts (n_ctx as given)
  qes-train   one full QES training step (seed replay) of the same model, same n_ctx: the model
              driver, the task, the ledger, population evaluation and the update
  torch-bf16 / torch-fp32   one full-parameter AdamW step of the same architecture in PyTorch on
              the CPU (weights dequantized from the GGUF), when torch is installed

    python benchmarks/bench_memory.py [--n-ctx 512]

Prints the table with ratios to inference and writes benchmarks/results/memory.json."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mode_inference(n_ctx: int) -> dict:
    from qes_edge.llama_runtime import load_llama
    from qes_edge.models import default_model_path
    from qes_edge.chat import load_template
    from qes_edge.tasks.sentiment import SentimentTask
    llm = load_llama(default_model_path(), n_ctx=n_ctx)
    task = SentimentTask()
    # the same prompts as training, through the model's own template, with the BOS/EOS texts from the
    # loaded vocabulary as the driver does (reading them from the file with gguf's reader costs ~170 MB)
    chat = load_template(default_model_path(), token_text=llm._model.token_get_text)
    from qes_edge.llama_runtime import forward
    for ex in task.train_examples()[:24]:
        text = chat.render(ex.chat()) + ex.prefill
        forward(llm, llm.tokenize(text.encode(), add_bos=False, special=True))
    return {"peak_rss_mb": peak_rss_mb()}


def mode_qes_train(n_ctx: int) -> dict:
    from qes_edge.driver import ModelDriver
    from qes_edge.gguf_model import file_sha256
    from qes_edge.ledger import Ledger
    from qes_edge.models import default_model_path
    from qes_edge.tasks import load_task
    from qes_edge.trainer import Trainer, TrainConfig
    path = default_model_path()
    cfg = TrainConfig(population=4, batch=24, n_ctx=n_ctx)
    driver = ModelDriver(path, n_ctx=n_ctx)
    with tempfile.TemporaryDirectory() as d:
        lg = Ledger(Path(d) / "m.qes")
        run = lg.create_run(file_sha256(path), path.name, cfg.record(), 1)
        tr = Trainer(driver, load_task("sentiment"), lg, run, cfg)
        t0 = time.perf_counter()
        for _ in range(2):  # the second step replays the first into its residual
            rec = tr.step()
        lg.close()
    return {"peak_rss_mb": peak_rss_mb(), "step_s": (time.perf_counter() - t0) / 2, "timings": rec.timings}


def mode_torch(n_ctx: int, dtype: str) -> dict:
    import torch
    from torch_llama import adamw_step
    return adamw_step(n_ctx, getattr(torch, dtype), peak_rss_mb)


MODES = {"inference": mode_inference, "qes-train": mode_qes_train,
         "torch-bf16": lambda n: mode_torch(n, "bfloat16"), "torch-fp32": lambda n: mode_torch(n, "float32")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--mode", choices=sorted(MODES))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    a = ap.parse_args(argv)
    if a.mode:  # child process: one mode, one JSON line
        print("RESULT " + json.dumps(MODES[a.mode](a.n_ctx)), flush=True)
        return
    try:
        import torch  # noqa: F401
        modes = list(MODES)
    except ImportError:
        modes = ["inference", "qes-train"]
        print("torch is not installed: PyTorch AdamW rows skipped (pip install torch==2.13.0)")
    results = {}
    for m in modes:
        p = subprocess.run([sys.executable, __file__, "--mode", m, "--n-ctx", str(a.n_ctx)],
                           capture_output=True, text=True, cwd=Path(__file__).parent)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"mode {m} failed:\n{p.stderr[-3000:]}")
        results[m] = json.loads(line[0][7:])
    base = results["inference"]["peak_rss_mb"]
    print(f"peak resident memory, SmolLM2-135M-Instruct Q4_1, n_ctx {a.n_ctx}:")
    for m, r in results.items():
        print(f"  {m:<11} {r['peak_rss_mb']:8.1f} MB   {r['peak_rss_mb'] / base:5.2f}x inference")
    out = {"n_ctx": a.n_ctx, "results": results, "ratios": {m: r["peak_rss_mb"] / base for m, r in results.items()},
           "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
