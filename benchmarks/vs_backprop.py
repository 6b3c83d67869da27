"""QES against backprop fine-tuning on the same CPU, for the same wall-clock budget (issue 22).

    python benchmarks/vs_backprop.py [--task continents] [--rows qes,lora8,lora16,full]
        [--minutes 30] [--threads 2] [--batch 24] [--qes "--population 16 --alpha 0.002"]

Every row trains the default model (SmolLM2-135M-Instruct Q4_1) on the same task, training
prompts and held-out set (a choice task of benchmarks/data through the model's chat template; the
prompts and choices are tokenized once, by qes-edge's own driver, and given to every row):

  qes     `qes-edge train --json`, stopped by SIGTERM when the budget is spent (the ledger keeps
          every recorded step), exported with `qes-edge export`: that GGUF is what a user deploys.
  lora8,  LoRA of rank 8 / 16 (alpha = 2 x rank) over the attention and MLP projections of the
  lora16  float32 weights dequantized from the GGUF (benchmarks/torch_llama.py), AdamW, SFT loss
          (cross-entropy of the right choice's tokens after the prompt), batch --batch.
  full    every weight, AdamW, the same loss.
  lora8-ckpt, full-ckpt   the same with gradient checkpointing (each block recomputed in the
          backward pass: what memory-minded LoRA tools such as unsloth do by default).

The budget is training time: from each row's first step, after its model is loaded and its
step-0 evaluation is done, to the end of the step that spends it (a QES process is stopped
where it is).  Each row runs alone, in its own process, with --threads threads (torch's and
llama.cpp's); its peak RSS is that process's ru_maxrss from os.wait4, measured from outside.

Held-out accuracy (the right choice scores highest, each choice scored by the mean log-probability
of its tokens, exactly as `qes-edge eval` scores a choice task):
  base            `qes-edge eval` of the base GGUF (llama.cpp)
  float           the backprop model in float32, in torch (and the base in torch, as a check that
                  torch_llama computes what llama.cpp does)
  deployed        the model as a user runs it: for backprop rows the weights merged, written as
                  an F32 GGUF and requantized to the base's tensor types by llama.cpp's quantizer
                  (llama_model_quantize; every tensor's type checked against the base), then
                  `qes-edge eval`; for QES the exported GGUF, `qes-edge eval`.

Every deployed GGUF is also asked the chat check of `qes-edge export` (one reply through its chat
template ends at an end-of-generation token): "reply ends" in the table; a QES export that fails
that check is written again with --no-check, scored, and the failure kept in its row.

Results: benchmarks/results/vs_backprop.json (one entry per row, rewritten after each row, so
a later call with other --rows adds to it); the table is printed at the end (--list: print it)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's qes_edge, as the child processes get it through PYTHONPATH
OUT = HERE / "results" / "vs_backprop.json"
DATA = {"continents": HERE / "data" / "continents.jsonl", "capitals": HERE / "data" / "capitals.jsonl"}
ROWS = {"qes": None, "lora8": {"rank": 8}, "lora16": {"rank": 16}, "full": {},
        "lora8-ckpt": {"rank": 8, "checkpoint": True}, "full-ckpt": {"checkpoint": True}}
LR = {"lora": 2e-4, "full": 2e-5}  # the usual starting points (PEFT/unsloth's LoRA 2e-4; full FT 1e-5..5e-5)


def env_for(home: Path) -> dict:
    env = dict(os.environ, QES_EDGE_HOME=str(home), OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def qes(*args) -> list[str]:
    return [sys.executable, "-m", "qes_edge", *map(str, args)]


def run_measured(cmd, env, budget_s=None, on_line=None, timeout=7200):
    """Run cmd; (rc, peak RSS MB from os.wait4, wall s).  With budget_s, SIGTERM it budget_s after
    on_line (called with each stdout line) first returns True (the clock start)."""
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started, err = [], []
    threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()

    def read():
        for line in p.stdout:
            if on_line is not None and on_line(line) and not started:
                started.append(time.time())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = time.time()
    while budget_s is not None:
        if p.poll() is not None:
            break
        if started and time.time() - started[0] >= budget_s:
            p.send_signal(signal.SIGTERM)
            break
        if time.time() - t0 > timeout:
            p.kill()
            break
        time.sleep(0.2)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(60)
    return p.returncode, usage.ru_maxrss / 1024, time.time() - t0, "".join(err)


def qes_eval(model: Path, data: Path, threads: int, home: Path) -> dict:
    r = subprocess.run(qes("eval", "--model", model, "--task", "choice", "--data", data, "--threads", threads,
                           "--json"), env=env_for(home), cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"qes-edge eval {model} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def reply_check(model: Path, threads: int, home: Path) -> dict:
    """The chat check `qes-edge export` makes (export_check.check_stock): does one reply through the
    model's own chat template end at an end-of-generation token within REPLY_TOKENS?  Asked of every
    row's deployed GGUF, in its own process (see main: no row starts from a process holding a model)."""
    code = ("import json, sys; from pathlib import Path; from qes_edge.llama.export_check import check_stock; "
            "p, saw = check_stock(Path(sys.argv[1]), [], True, int(sys.argv[2])); "
            "print(json.dumps({'ends': not p, 'saw': saw}))")
    r = subprocess.run([sys.executable, "-c", code, str(model), str(threads)], env=env_for(home), cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the reply check of {model} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- tokens: one tokenization, by the product's driver, for every row ---------------------------------

def tokenize(data: Path, path: Path) -> None:
    from qes_edge.llama.driver import ModelDriver
    from qes_edge.gguf.models import default_model_path
    from qes_edge.tasks import load_task
    task = load_task("choice", data=str(data), seed=0)
    d = ModelDriver(default_model_path(), n_threads=1)

    def rows(examples):
        return [{"prompt": d.prompt_tokens(ex), "choices": [task.tokens_of(d, c) for c in ex.meta["choices"]],
                 "answer": task.answer_index(ex)} for ex in examples]
    path.write_text(json.dumps({"train": rows(task.train_examples()), "heldout": rows(task.heldout_examples())}))


# -- a backprop row (the child process) -------------------------------------------------------------

def child(a) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(HERE))
    from torch_llama import Lora, forward, load_weights
    from qes_edge.gguf.models import default_model_path

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    toks = json.loads(Path(a.tokens).read_text())
    cfg, p = load_weights(default_model_path(), torch.float32, requires_grad=a.row == "full")
    spec = ROWS[a.row]
    lora = Lora(p, spec["rank"], 2.0 * spec["rank"], seed=a.seed) if "rank" in spec else None
    params = lora.parameters() if lora else list(p.values())
    lr = a.lr or LR["lora" if lora else "full"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def padded(seqs):
        n = max(len(s) for s in seqs)
        return torch.tensor([s + [0] * (n - len(s)) for s in seqs])

    def answer_rows(seqs, spans):
        """(batch index, position) of every position whose next token is an answer token, and those tokens."""
        bi, ti, tgt = [], [], []
        for j, (n_p, n_c) in enumerate(spans):
            bi += [j] * n_c
            ti += range(n_p - 1, n_p - 1 + n_c)
            tgt += seqs[j][n_p:n_p + n_c]
        return (torch.tensor(bi), torch.tensor(ti)), torch.tensor(tgt)

    @torch.no_grad()
    def evaluate(rows):
        seqs, where = [], []
        for i, r in enumerate(rows):
            for c in r["choices"]:
                seqs.append(r["prompt"] + c)
                where.append((i, len(r["prompt"]), len(c)))
        scores = [[] for _ in rows]
        for k in range(0, len(seqs), 32):
            chunk, spans = seqs[k:k + 32], [(n_p, n_c) for _, n_p, n_c in where[k:k + 32]]
            sel, tgt = answer_rows(chunk, spans)
            lp = torch.log_softmax(forward(cfg, p, padded(chunk), lora, rows=sel).float(), -1)
            lp = lp.gather(-1, tgt[:, None])[:, 0]
            at = 0
            for (i, _, n_c) in where[k:k + 32]:
                scores[i].append(float(lp[at:at + n_c].mean()))
                at += n_c
        hits = [int(np.argmax(s)) == r["answer"] for s, r in zip(scores, rows)]
        pc = [float(np.exp(s[r["answer"]] - np.logaddexp.reduce(s))) for s, r in zip(scores, rows)]
        return {"accuracy": float(np.mean(hits)), "reward": float(np.mean(pc))}

    def loss_of(batch):
        seqs = [r["prompt"] + r["choices"][r["answer"]] for r in batch]
        spans = [(len(r["prompt"]), len(r["choices"][r["answer"]])) for r in batch]
        sel, tgt = answer_rows(seqs, spans)
        logits = forward(cfg, p, padded(seqs), lora, rows=sel, checkpoint=spec.get("checkpoint", False))
        ce = F.cross_entropy(logits.float(), tgt, reduction="none")
        # per example the mean over its answer's tokens (as choice_norm "mean"), then over the batch
        per, at = [], 0
        for _, n_c in spans:
            per.append(ce[at:at + n_c].mean())
            at += n_c
        return torch.stack(per).mean()

    out = {"row": a.row, "lr": lr, "batch": a.batch, "threads": a.threads, "curve": []}
    out["float_step0"] = evaluate(toks["heldout"])
    print(json.dumps({"event": "start"}), flush=True)  # the parent's budget starts here
    rng = np.random.default_rng(a.seed)
    order, pos, step, step_s, losses = rng.permutation(len(toks["train"])), 0, 0, [], []
    checkpoints = [a.budget_s * f for f in (1 / 3, 2 / 3)]
    clock, t_start = 0.0, time.time()
    while clock < a.budget_s:
        t = time.time()
        if pos + a.batch > len(order):
            order, pos = rng.permutation(len(toks["train"])), 0
        batch = [toks["train"][i] for i in order[pos:pos + a.batch]]
        pos += a.batch
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        step += 1
        step_s.append(time.time() - t)
        clock += step_s[-1]
        losses.append(float(loss))
        if checkpoints and clock >= checkpoints[0]:
            checkpoints.pop(0)
            out["curve"].append({"train_s": round(clock, 1), "step": step, **evaluate(toks["heldout"])})
    out.update(steps=step, train_s=round(clock, 1), step_s_median=float(np.median(step_s)),
               loss_first=losses[0], loss_last=float(np.mean(losses[-5:])), wall_s=round(time.time() - t_start, 1))
    out["float"] = evaluate(toks["heldout"])
    write_f32_gguf(default_model_path(), lora.merged(p) if lora else {n: w.detach() for n, w in p.items()},
                   Path(a.gguf_out))
    Path(a.result).write_text(json.dumps(out))


def write_f32_gguf(base: Path, weights: dict, out: Path) -> None:
    """Every key of base, general.file_type ALL_F32, every tensor float32 (the quantizer's input)."""
    import gguf
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type") or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, weights[t.name].float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def requantize(f32: Path, out: Path, base: Path, threads: int) -> None:
    """llama.cpp's quantizer, to the base's file type, then every tensor's type checked against base's."""
    import gguf
    import llama_cpp
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(base).tensors}
    ftype = int(gguf.GGUFReader(base).fields["general.file_type"].contents())
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = threads, ftype
    params.token_embedding_type = int(types["token_embd.weight"])
    params.output_tensor_type = int(types.get("output.weight", types["token_embd.weight"]))
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    got = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    wrong = {n: (types[n].name, got.get(n)) for n in types if got.get(n) != types[n]}
    if wrong:
        raise SystemExit(f"the requantized model's tensor types differ from the base's: {wrong}")


# -- the rows ---------------------------------------------------------------------------------------

def backprop_row(row, a, tmp: Path, tokens: Path) -> dict:
    res, f32, q = tmp / f"{row}.json", tmp / f"{row}.f32.gguf", tmp / f"{row}.gguf"
    cmd = [sys.executable, __file__, "--child", row, "--tokens", str(tokens), "--result", str(res),
           "--gguf-out", str(f32), "--budget-s", str(a.minutes * 60), "--threads", str(a.threads),
           "--batch", str(a.batch), "--seed", str(a.seed)] + (["--lr", str(a.lr)] if a.lr else [])
    rc, rss, wall, err = run_measured(cmd, env_for(tmp))
    if rc != 0:
        raise SystemExit(f"{row} failed ({rc}): {err[-3000:]}")
    out = json.loads(res.read_text())
    from qes_edge.gguf.models import default_model_path
    requantize(f32, q, default_model_path(), a.threads)
    f32.unlink()
    out["deployed"] = qes_eval(q, DATA[a.task], a.threads, tmp)
    out["reply"] = reply_check(q, a.threads, tmp)
    out.update(peak_rss_mb=round(rss, 1), process_wall_s=round(wall, 1),
               command=f"python benchmarks/vs_backprop.py --rows {row} --minutes {a.minutes} --threads {a.threads} "
                       f"--batch {a.batch}" + (f" --lr {a.lr}" if a.lr else ""))
    return out


def qes_row(a, tmp: Path) -> dict:
    ledger, q = tmp / "run.qes", tmp / "qes.gguf"
    extra = shlex.split(a.qes)
    cmd = qes("train", "--task", "choice", "--data", DATA[a.task], "--json", "--steps", 100000,
              "--batch", a.batch, "--threads", a.threads, "--seed", a.seed, "--ledger", ledger, *extra)
    steps = []

    def on_line(line):
        if not line.startswith("{"):
            return False
        e = json.loads(line)
        if e["event"] == "step":
            steps.append((time.time(), e))
        return e["event"] == "eval"  # the step-0 evaluation is done: training starts
    rc, rss, wall, err = run_measured(cmd, env_for(tmp), budget_s=a.minutes * 60, on_line=on_line)
    if rc not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        raise SystemExit(f"qes train failed ({rc}): {err[-3000:]}")
    export = qes("export", "--ledger", ledger, "--out", q, "--threads", a.threads)
    r = subprocess.run(export, env=env_for(tmp), cwd=ROOT, capture_output=True, text=True)
    check = "passed"
    if r.returncode != 0 and "failed its check" in r.stderr:
        # the trained model is still what the run made: score it as written, and say the check failed
        check = r.stderr.strip().splitlines()[-1]
        r = subprocess.run(export + ["--no-check"], env=env_for(tmp), cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"qes-edge export failed: {r.stderr[-2000:]}")
    import numpy as np
    gaps = np.diff([t for t, _ in steps])
    return {"row": "qes", "steps": len(steps), "qes_args": a.qes, "batch": a.batch, "threads": a.threads,
            "step_s_median": float(np.median(gaps)) if len(gaps) else None,
            "changed_median": int(np.median([e["changed"] for _, e in steps])) if steps else 0,
            "deployed": qes_eval(q, DATA[a.task], a.threads, tmp), "export_check": check,
            "reply": reply_check(q, a.threads, tmp), "peak_rss_mb": round(rss, 1),
            "process_wall_s": round(wall, 1),
            "command": f"python benchmarks/vs_backprop.py --rows qes --minutes {a.minutes} --threads {a.threads} "
                       f"--batch {a.batch} --qes {shlex.quote(a.qes)}"}


def table(data: dict) -> None:
    base = data.get("base", {})
    print(f"base (llama.cpp, Q4_1): held-out accuracy {base.get('accuracy', float('nan')):.3f}; torch float32 "
          f"of the same weights: {data.get('base_float', {}).get('accuracy', float('nan')):.3f}")
    print(f"{'row':<8} {'minutes':>7} {'steps':>6} {'s/step':>7} {'peak RSS MB':>11} {'float acc':>9} "
          f"{'deployed acc':>12} {'reply ends':>10}  deployed = requantized to the base's types / the QES export")
    for name in ROWS:
        r = data["rows"].get(name)
        if r is None:
            continue
        fl = f"{r['float']['accuracy']:.3f}" if "float" in r else "—"
        print(f"{name:<8} {r['minutes']:>7g} {r['steps']:>6} {r['step_s_median'] or float('nan'):>7.1f} "
              f"{r['peak_rss_mb']:>11.0f} {fl:>9} {r['deployed']['accuracy']:>12.3f} "
              f"{('yes' if r['reply']['ends'] else 'no') if 'reply' in r else '—':>10}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="continents", choices=sorted(DATA))
    ap.add_argument("--rows", default="qes,lora8,lora16,full")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="backprop learning rate (default: LoRA 2e-4, full 2e-5)")
    ap.add_argument("--qes", default="--population 16 --alpha 0.002",
                    help="more `qes-edge train` options for the qes row (default: the A/B's best on continents so far, "
                         "benchmarks/results/ab.json)")
    ap.add_argument("--out", type=Path, default=OUT, help="results file (default: %(default)s)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    for x in ("--tokens", "--result", "--gguf-out"):
        ap.add_argument(x, help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.row = a.child
        child(a)
        return 0
    out = a.out
    data = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    if a.list:
        table(data)
        return 0
    rows = a.rows.split(",")
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}: {', '.join(ROWS)}")
    if data.get("task", a.task) != a.task:
        raise SystemExit(f"{out} holds task {data['task']!r}; move it away to measure {a.task!r}")
    from qes_edge.gguf.models import default_model_path
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = tmp / "tokens.json"
        # in a child: a process forked from one holding the model would start at its resident
        # set, and os.wait4's peak of every row would be at least that
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import vs_backprop as v; "
                        "from pathlib import Path; v.tokenize(Path(sys.argv[2]), Path(sys.argv[3]))",
                        str(HERE), str(DATA[a.task]), str(tokens)], env=env_for(tmp), cwd=ROOT, check=True)
        data.update(task=a.task, base=qes_eval(default_model_path(), DATA[a.task], a.threads, tmp),
                    date=time.strftime("%Y-%m-%d"), cpu=os.cpu_count())
        for row in rows:
            print(f"{time.strftime('%H:%M')} {row}: {a.minutes:g} min ...", flush=True)
            r = qes_row(a, tmp) if row == "qes" else backprop_row(row, a, tmp, tokens)
            r["minutes"] = a.minutes
            if "float_step0" in r:
                data["base_float"] = r["float_step0"]
            data["rows"][row] = r
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            print(f"  {json.dumps({k: v for k, v in r.items() if k != 'curve'})}", flush=True)
    table(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
