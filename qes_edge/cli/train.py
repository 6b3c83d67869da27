"""Commands that train or score: train, eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qes_edge.cli import common
from qes_edge.native.quant import QESError
from qes_edge.training.config import TrainConfig
from qes_edge.cli.common import (ChoiceNormOpt, ConfigOpt, EvalBatchOpt, PrintConfigOpt, RewardOpt, GpuLayersOpt, ModelOpt, RawPromptOpt, ThreadsOpt, _explicit, _fail, _json_output, _user_errors, app, check_executor_options, peer_urls)


@app.command()
def train(ctx: typer.Context,
          config: Optional[Path] = ConfigOpt,
          model: Optional[str] = ModelOpt,
          task: str = typer.Option(TrainConfig.task, help="sentiment | choice | countdown | jsonl | module:function (a reward)."),
          data: Optional[Path] = typer.Option(None, help="JSONL prompts for the jsonl task or a module:function reward."),
          rewards: Optional[List[str]] = RewardOpt,
          steps: int = typer.Option(20, min=1, help="Steps to reach (counting those already in the ledger)."),
          population: int = typer.Option(TrainConfig.population, min=2, help="Members per step, as mirrored pairs (even)."),
          sigma: float = typer.Option(TrainConfig.sigma, help="Noise scale in code units (about 0.8*sigma of codes move)."),
          alpha: float = typer.Option(TrainConfig.alpha, help="Step size: step = alpha/sigma * sum c_i eps_i + beta * residual."),
          beta: float = typer.Option(TrainConfig.beta, help="Residual decay of error feedback, in [0, 1]."),
          window: int = typer.Option(TrainConfig.window, min=0, help="Steps replayed into the residual (seed-replay mode)."),
          error_feedback: bool = typer.Option(TrainConfig.error_feedback, "--error-feedback/--no-error-feedback", help="Accumulate rounding residuals (QES) or not (QuZO-style)."),
          residual: str = typer.Option(TrainConfig.residual, help="replay: rebuild the residual from the ledger; stored: keep int32 per code in memory."),
          batch: int = typer.Option(TrainConfig.batch, min=1, help="Prompts per step (all members see the same ones)."),
          balance: bool = typer.Option(TrainConfig.balance, "--balance/--no-balance", help="Class-balanced prompts per step when the task has classes."),
          seed: int = typer.Option(TrainConfig.seed, help="Run seed: prompts and member seeds derive from it and the step."),
          ledger: Optional[Path] = typer.Option(None, help="Ledger file (default: <home>/runs/<model>.<task>.s<seed>.qes, "
                                                           "home being $QES_EDGE_HOME or the user data folder)."),
          resume: bool = typer.Option(False, "--resume", help="Continue the ledger's run with its recorded config even "
                                                               "where options given here differ (they are ignored)."),
          new_run: bool = typer.Option(False, "--new-run", help="Start a new run in a ledger that holds one (the old run "
                                                                 "stays: replay --run-id rebuilds it)."),
          eval_every: int = typer.Option(0, min=0, help="Held-out evaluation every N steps (0: at start and end only)."),
          threads: int = ThreadsOpt,
          gpu_layers: str = GpuLayersOpt,
          n_ctx: int = typer.Option(TrainConfig.n_ctx, help="llama.cpp context size in tokens (64 or more)."),
          raw_prompt: bool = RawPromptOpt,
          choice_norm: str = ChoiceNormOpt,
          eval_batch: int = EvalBatchOpt,
          coef_scheme: str = typer.Option(TrainConfig.coef_scheme, "--coef-scheme",
                                          help="Member rewards to coefficients: pairs (the paper's mirrored "
                                               "pairs: z-scored pair differences), pairs-rank, zscore (member "
                                               "z-scores, runs before pairs) or rank."),
          as_json: bool = typer.Option(False, "--json", help="One JSON line per step and per evaluation on stdout "
                                                              "(human messages and progress go to stderr)."),
          peers: Optional[str] = typer.Option(None, "--peers", help="Share each step's population with workers "
                                                                   "(`qes-edge worker`), comma-separated: "
                                                                   "socket://HOST:PORT or serial devices. With "
                                                                   "the workers at this --threads and "
                                                                   "--gpu-layers (a GPU's rewards differ from the "
                                                                   "CPU's in their last bits: a worker placed "
                                                                   "otherwise is refused), the ledger is the one "
                                                                   "recorded without them."),
          ray: Optional[int] = typer.Option(None, "--ray", min=1, help="Evaluate each step's population on this "
                                                                      "many Ray actors, each with its own copy of "
                                                                      "the model (pip install 'qes-edge[ray]'; "
                                                                      "the cluster in RAY_ADDRESS, else a local "
                                                                      "Ray)."),
          print_config: bool = PrintConfigOpt):
    """Fine-tune a GGUF model in place with QES; every step is recorded in the ledger and a
    re-run with the same ledger resumes where it stopped, with the config it recorded. Options
    that differ from that config are refused (--resume ignores them, --new-run starts a new run).

    Example: qes-edge train --steps 50 --population 16 --alpha 0.00125  (or -c run.toml)"""
    if print_config:
        _print_config(ctx)
        return
    with _json_output(as_json):
        _train(ctx, model, data, steps, ledger, resume, new_run, eval_every, threads, as_json, peers, ray, gpu_layers)


def _train(ctx, model, data, steps, ledger, resume, new_run, eval_every, threads, as_json, peers, ray, gpu_layers=0):
    """train's work; the run's config comes from its options (ctx.params) through TrainConfig.from_options."""
    from qes_edge.training.opening import check_data_option
    from qes_edge.training.session import RUN_OPTIONS, Session, SessionOptions

    with _user_errors():
        data = check_data_option(data)
        cfg = TrainConfig.from_options({**ctx.params, "data": data})
        opts = SessionOptions(cfg, model=model, ledger=ledger, explicit=_explicit(ctx, RUN_OPTIONS), resume=resume,
                              new_run=new_run, threads=threads, gpu_layers=gpu_layers)
        check_executor_options(peers, ray)
        links = _peer_links(peers)  # reached before anything is written
        try:
            session = Session.open(opts, say=lambda m: common.console.print(m, markup=False, highlight=False))
        except BaseException:
            for link in links:
                link.close()
            raise
    with session, _user_errors():
        if links:  # the workers' handshake: one that cannot share the run is left out, said
            session.share_with_peers(links)
        elif ray is not None:
            session.share_with_ray(ray)
        _train_session(session, steps, eval_every, as_json)


def _print_config(ctx) -> None:
    """--print-config: every option as resolved (file, command line, defaults), and what the run
    would record, as TOML that --config reads back."""
    from qes_edge.cli.config_file import to_toml
    from qes_edge.training.opening import check_data_option
    with _user_errors():
        data = check_data_option(ctx.params.get("data"))
    cfg = TrainConfig.from_options({**ctx.params, "data": data})
    try:
        cfg.validate()
    except (ValueError, QESError) as e:
        _fail(str(e))
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}
    params["data"] = str(data) if data else None
    params["eval_batch"] = cfg.eval_batch  # resolved by task where not given
    header = ("qes-edge train: the resolved options (qes-edge train -c this-file.toml runs them)\n"
              f"recorded with them: split = {cfg.split}, frozen = {list(cfg.frozen)}, derive = {cfg.derive}")
    typer.echo(to_toml(ctx.command, params, header), nl=False)


def _peer_links(peers: Optional[str]) -> list:
    """The links to `--peers` (comma-separated URLs), each opened; one that cannot be is the error."""
    if peers is None:
        return []
    from qes_edge.sync import LinkError, open_link
    urls = peer_urls(peers)
    links = []
    try:
        for u in urls:
            links.append(open_link(u))
    except LinkError as e:
        for link in links:
            link.close()
        _fail(f"--peers: {e}")
    return links


def _train_session(session, steps: int, eval_every: int, as_json: bool) -> None:
    """Train an open session in the foreground with progress bars (and JSON events)."""
    cfg, driver = session.cfg, session.driver
    common.console.print(f"{session.model_path.name}: {len(driver.tensors)} tensors, {driver.n_codes:,} codes; task {cfg.task}; "
                         f"population {cfg.population}, sigma {cfg.sigma}, alpha {cfg.alpha}, "
                         f"error feedback {'on (' + cfg.residual + ')' if cfg.error_feedback else 'off'}; "
                         f"{session.threads} threads; ledger {session.ledger_path}")
    common.console.print(driver.describe_layout(), markup=False, highlight=False)
    if session.task.describe_data():
        common.console.print(session.task.describe_data(), markup=False, highlight=False)
    if driver.gpu_layers:
        from qes_edge.llama.placement import describe_gpu_layers, summary
        common.console.print(f"--gpu-layers {describe_gpu_layers(driver.gpu_layers)}: trainable tensors "
                             f"{summary(driver.tensors)}", markup=False, highlight=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=common.console)
    with progress:
        done = session.recorded_steps()
        if done:
            bar = progress.add_task("replaying ledger", total=done, info="")
            session.catch_up(lambda i, n: progress.update(bar, completed=i))
        session.record_memory()
        n_heldout = len(session.task.heldout_examples())
        eval_bar = []

        def on_prompt():
            if not eval_bar:
                eval_bar.append(progress.add_task(f"held-out ({n_heldout})", total=n_heldout, info=""))
            progress.advance(eval_bar[0])

        def on_eval(step, m, failure, split="heldout"):
            if eval_bar:
                progress.remove_task(eval_bar.pop())
            what = "held-out" if split == "heldout" else split
            if failure:
                progress.console.print(f"[yellow]{what} evaluation failed:[/] {failure}")
                return
            if as_json:
                typer.echo(json.dumps({"event": "eval", "step": step, "split": split, **m}))
            progress.console.print(f"step {step} {what}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))

        bar = progress.add_task("training", total=steps, completed=session.step, info="")

        def on_step(rec):
            t = rec.timings
            if as_json:
                typer.echo(json.dumps({"event": "step", "step": rec.step, "reward": float(np.nanmean(rec.rewards)),
                                       "rewards": [None if np.isnan(x) else float(x) for x in rec.rewards],
                                       "failures": rec.failures, "changed": t["changed"],
                                       "weights_sha256": rec.weights_sha256, "hash": rec.hash, "timings": t}))
            overhead = (t["perturb_s"] + t["restore_s"] + t["update_s"]) / max(t["eval_s"], 1e-9)
            if t.get("no_signal"):
                from qes_edge.training.no_signal import alarm
                quiet = alarm(*session.no_signal_streak())
                progress.console.print(f"[yellow]step {rec.step}: no signal[/] ({t['no_signal']})"
                                       + (f"\n[yellow]{quiet}[/]" if quiet else ""), highlight=False)
            progress.update(bar, completed=session.step,
                            info=f"reward {np.nanmean(rec.rewards):.3f}  changed {t['changed']}  overhead {overhead:.1%}")

        session.train(steps, eval_every=eval_every, on_step=on_step, on_eval=on_eval, on_prompt=on_prompt)
    common.console.print(f"done: {session.step} steps in {session.ledger_path}")
    head = session.head()
    if as_json:
        typer.echo(json.dumps({"event": "done", "steps": session.step, "ledger": str(session.ledger_path),
                               "run_id": session.run.run_id, "head": head}))
    else:
        typer.echo(f"head {head}")  # one unbroken line, to compare between copies


@app.command("eval")
def evaluate(model: Optional[str] = ModelOpt,
             task: str = typer.Option("sentiment", help="Task whose held-out examples to score (as for train)."),
             data: Optional[Path] = typer.Option(None, help="JSONL data for the jsonl, choice and module:function tasks."),
             seed: int = typer.Option(0, help="Task seed (as the run's, for generated tasks)."),
             threads: int = ThreadsOpt,
             gpu_layers: str = GpuLayersOpt,
             n_ctx: int = typer.Option(512, help="llama.cpp context size in tokens (64 or more)."),
             raw_prompt: bool = RawPromptOpt,
             choice_norm: str = ChoiceNormOpt,
             eval_batch: int = EvalBatchOpt,
             split: str = typer.Option("heldout", "--split", help="Which examples: heldout (what a run holds out: "
                                                                  "valid.jsonl of a data folder, else a fixed 20% "
                                                                  "of the file), valid, test (a data folder's "
                                                                  "test.jsonl), train, or all."),
             as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object.")):
    """Score a model (the base, or one written by replay) on a task's held-out examples (or
    another --split): the same numbers train prints at its evaluations.

    Example: qes-edge eval --model trained.gguf --data my-data/ --split test --json"""
    from qes_edge.tasks.data import EVAL_SPLITS
    from qes_edge.tasks.base import RewardFailure
    from qes_edge.threads import resolve_threads
    from qes_edge.training.opening import load_task, open_driver, prepare_driver, trainable_model
    if split not in EVAL_SPLITS:
        _fail(f"--split {split!r}: choose one of {', '.join(EVAL_SPLITS)}")
    with _user_errors():
        from qes_edge.training.opening import check_data_option
        data = check_data_option(data)
    cfg = TrainConfig.from_options(dict(task=task, data=data, seed=seed, n_ctx=n_ctx, raw_prompt=raw_prompt,
                                        choice_norm=choice_norm, eval_batch=eval_batch))
    try:
        cfg.validate()
    except (ValueError, QESError) as e:
        _fail(str(e))
    with _user_errors():
        path = trainable_model(model, cfg.frozen)
        task_obj = load_task(cfg, path)
        driver = open_driver(path, n_ctx, resolve_threads(threads), gpu_layers=gpu_layers)
        prepare_driver(driver, task_obj, cfg)
    try:
        heldout = task_obj.examples_of(split)
    except ValueError as e:
        _fail(str(e))
    if task_obj.describe_data():
        typer.echo(task_obj.describe_data(), err=True)
    try:
        with Progress(TextColumn(split), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=common.make_console(stderr=True), transient=True) as progress:
            bar = progress.add_task("held-out", total=len(heldout))
            driver.on_prompt = lambda: progress.advance(bar)
            metrics = task_obj.evaluate(driver, heldout)
    except (RewardFailure, ValueError, QESError) as e:
        _fail(f"{path}: {e}")
    finally:
        driver.on_prompt = None
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    table = Table(title=f"{path.name}: {task}, {len(heldout)} {'held-out' if split == 'heldout' else split} examples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.3f}")
    common.console.print(table)
