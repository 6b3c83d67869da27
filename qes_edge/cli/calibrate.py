"""The calibrate command: measure a few sigmas on the real model, recommend a train command line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer

from qes_edge.cli import common
from qes_edge.cli.common import ChoiceNormOpt, EvalBatchOpt, ModelOpt, RawPromptOpt, ThreadsOpt, _fail, _user_errors, app
from qes_edge.training.calibrate import DEFAULT_SIGMAS


def _sigmas(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--sigmas must be comma-separated numbers, got {text!r}")
    if not out:
        _fail("--sigmas needs at least one sigma")
    return out


@app.command()
def calibrate(model: Optional[str] = ModelOpt,
              task: str = typer.Option("sentiment", help="The task to calibrate for (as for train)."),
              data: Optional[Path] = typer.Option(None, help="JSONL data for the jsonl, choice and module:function tasks."),
              seed: int = typer.Option(0, help="Run seed (member seeds and the two probe batches derive from it)."),
              sigmas: str = typer.Option(",".join(f"{s:g}" for s in DEFAULT_SIGMAS),
                                         help="Comma-separated sigmas to measure."),
              pairs: int = typer.Option(4, min=2, help="Mirrored pairs measured at each sigma."),
              batch: int = typer.Option(24, min=1, help="Prompts in each of the two probe batches."),
              heldout: int = typer.Option(48, min=1, help="Held-out examples scored for each member's damage."),
              hours: float = typer.Option(8.0, min=0.01, help="The time the run will have, for population and batch."),
              threads: int = ThreadsOpt,
              n_ctx: int = typer.Option(512, help="llama.cpp context size in tokens (64 or more)."),
              raw_prompt: bool = RawPromptOpt,
              choice_norm: str = ChoiceNormOpt,
              eval_batch: int = EvalBatchOpt,
              as_json: bool = typer.Option(False, "--json", help="The measurements and the recommendation as JSON.")):
    """Measure, at a few sigmas, the held-out damage of perturbed members, the spread of mirrored-pair
    reward differences against the reward's resolution, and whether they agree between two
    independent batches; recommend sigma, alpha, population and batch for --hours, and print the
    train command line.  The budget is stated before it is spent:
    sigmas x (2 x pairs x (2 x batch + heldout) + heldout) prompts.

    Example: qes-edge calibrate --task choice --data capitals.jsonl --hours 8"""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from qes_edge.training.calibrate import as_dict, probe_sigma, recommend
    from qes_edge.native.engine import sigma_threshold
    from qes_edge.native.quant import QESError
    from qes_edge.training.opening import check_data_option, load_task, open_driver, prepare_driver, trainable_model
    from qes_edge.tasks.base import RewardFailure
    from qes_edge.threads import resolve_threads
    from qes_edge.training.config import TrainConfig, default_eval_batch

    values = _sigmas(sigmas)
    with _user_errors():
        data = check_data_option(data)
        cfg = TrainConfig(task=task, data=str(data) if data else None, seed=seed, n_ctx=n_ctx, raw_prompt=raw_prompt,
                          choice_norm=choice_norm, batch=batch, population=2 * pairs,
                          eval_batch=eval_batch if eval_batch is not None else default_eval_batch(task))
        try:
            cfg.validate()
            for s in values:
                sigma_threshold(s)
        except (ValueError, QESError) as e:
            _fail(str(e))
        path = trainable_model(model, cfg.frozen)
        task_obj = load_task(cfg, path)
        n_threads = resolve_threads(threads)
        driver = open_driver(path, n_ctx, n_threads, cfg.frozen)
        prepare_driver(driver, task_obj, cfg)
    all_held = list(task_obj.heldout_examples())
    held = all_held[:heldout]
    prompts = len(values) * (2 * pairs * (2 * batch + len(held)) + len(held))
    err = common.make_console(stderr=True)
    err.print(f"calibrating {path.name} on task {task}: {len(values)} sigmas x {pairs} mirrored pairs, two batches of "
              f"{batch} and {len(held)} held-out examples each: {prompts:,} prompts scored", highlight=False,
              soft_wrap=True)
    probes = []
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=err, transient=True) as progress:
            for s in values:
                bar = progress.add_task(f"sigma {s:g}", total=2 * pairs)
                probes.append(probe_sigma(driver, task_obj, s, pairs, batch, held, seed, n_threads,
                                          on_member=lambda: progress.advance(bar)))
    except (RewardFailure, ValueError, QESError) as e:
        _fail(f"{path}: {e}")
    rec = recommend(probes, hours, cfg.beta, n_train=len(task_obj.train_examples()),
                    eval_prompts=2 * len(all_held))  # train's evaluations: start and end
    line = ["qes-edge", "train"] + (["--model", str(model)] if model else []) + ["--task", task] + \
        (["--data", str(data)] if data else []) + ["--sigma", f"{rec.sigma:g}", "--alpha", f"{rec.alpha:g}",
                                                   "--population", str(rec.population), "--batch", str(rec.batch),
                                                   "--steps", str(rec.steps_in_budget), "--seed", str(seed)]
    command = shlex.join(line)
    if as_json:
        typer.echo(json.dumps({**as_dict(probes, rec), "command": command, "budget_prompts": prompts}))
        return
    common.console.print(f"{'sigma':>7} {'held-out':>9} {'damage':>8} {'pair spread':>12} {'resolution':>11} "
                         f"{'agreement':>10} {'s/prompt':>9}", highlight=False)
    for p in probes:
        common.console.print(f"{p.sigma:>7g} {p.base_heldout:>9.3f} {p.damage:>8.1%} {p.spread:>12.4f} "
                             f"{p.resolution:>11.4f} {p.agreement:>+10.2f} {p.seconds / p.prompts:>9.3f}", highlight=False)
    for r in rec.reasons:
        common.console.print(f"- {r}", highlight=False, markup=False)
    typer.echo(command)
