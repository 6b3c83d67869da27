"""Commands over a run's ledger: replay, export, verify, dump, runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from qes_edge.cli import common
from qes_edge.native.quant import QESError
from qes_edge.cli.common import (JsonOpt, ThreadsOpt, _fail, _json_output, _one_line, _open_ledger_readonly, app)


StepOpt = typer.Option(None, "--step", metavar="N|best", help="Rebuild the weights after the first N steps (0: the base), or 'best': "
                                             "after the step whose held-out score is highest (default: every step).")


def _chosen_step(lg, run, n: int, step: Optional[str]) -> tuple[int, str]:
    from qes_edge.ledger.runlog import choose_step
    try:
        return choose_step(step, n, lg.evals(run.run_id))
    except ValueError as e:
        _fail(str(e))


def _export_path(run, n: int) -> Path:
    """export's default output: <home>/exports/<model>.<run>.s<steps>.gguf (the folder made)."""
    from qes_edge.home import home
    path = home() / "exports" / f"{Path(run.base_name).stem}.{run.run_id[:8]}.s{n}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _rebuild(ledger: Path, run_id: Optional[str], base: Optional[str], threads: int, out: Optional[Path],
             step: Optional[str] = None):
    """Replay a verified run onto its base, all its steps or the first --step of them: (run, base
    path, GGUFModel, trained tensors, steps replayed, their head hash, whether any code differs
    from the base, which steps and why, the output path).  `out` None: export's default name,
    which carries the chosen step (_export_path).  The ledger is opened and verified once.  One-line errors for every bad input; exit 1 on a weights mismatch."""
    from qes_edge.atomic import check_output_path
    from qes_edge.native.engine import digest_tensors
    from qes_edge.gguf.model import GGUFModel, file_sha256
    from qes_edge.ledger.store import LedgerError
    from qes_edge.gguf.models import ModelNotFound, run_base_model
    from qes_edge.threads import resolve_threads
    from qes_edge.training.config import TrainConfig
    from qes_edge.training.replica import Replica

    if out is not None:
        try:
            check_output_path(out, {"ledger": ledger, "base model": base})
        except ValueError as e:
            _fail(str(e))
    lg, run, n = _open_ledger_readonly(ledger, run_id)
    try:
        n, chosen = _chosen_step(lg, run, n, step)
        if out is None:
            out = _export_path(run, n)
        try:
            base_path = run_base_model(run, base)
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
        replica = Replica(tensors, cfg, resolve_threads(threads))
        try:
            with Progress(TextColumn("replay"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeRemainingColumn(), console=common.console) as progress:
                bar = progress.add_task("replay", total=n)
                replica.catch_up(lg.steps(run.run_id, 0, n), lambda done, total: progress.update(bar, completed=done))
        except LedgerError as e:
            typer.echo(f"mismatch: {_one_line(e)}", err=True)
            raise typer.Exit(1)
        head = lg.step_hashes(run.run_id, [n - 1])[n - 1] if n else run.hash
    finally:
        lg.close()
    return run, base_path, m, tensors, n, head, digest_tensors(tensors) != base_digest, chosen, out


@app.command()
def replay(ledger: Path = typer.Option(..., help="The run's ledger."),
           out: Path = typer.Option(..., help="Where to write the trained GGUF."),
           base: Optional[str] = typer.Option(None, help="Base model, any name --model takes (default: the default model, "
                                                          "if the ledger names it)."),
           run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest)."),
           step: Optional[str] = StepOpt,
           threads: int = ThreadsOpt,
           as_json: bool = JsonOpt):
    """Rebuild a trained model from its base GGUF and the ledger alone, checking every recorded
    hash and the ledger's head; prints the head hash (of the last step replayed); exits 1 on a
    weights mismatch.  --step N or --step best rebuilds an earlier point of the run (a run whose
    held-out score peaked before its end).

    Example: qes-edge replay --ledger run.qes --out trained.gguf [--step best]"""
    with _json_output(as_json):
        run, base_path, m, tensors, n, head, changed, chosen, out = _rebuild(ledger, run_id, base, threads, out, step)
        try:
            m.write(tensors, out)
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror or e} (nothing was written; the ledger is untouched)")
        common.console.print(f"{n} steps replayed ({chosen}), every weights hash matched; wrote {out}", highlight=False)
        if not changed:
            common.console.print("note: no code differs from the base model: the file written is the base's weights")
    if as_json:
        typer.echo(json.dumps({"out": str(out), "run_id": run.run_id, "steps": n, "head": head, "changed": changed,
                               "chosen": chosen}))
    else:
        typer.echo(f"head {head}")


@app.command()
def export(ledger: Path = typer.Option(..., help="The run's ledger."),
           out: Optional[Path] = typer.Option(None, help="The GGUF to write (default: <home>/exports/<model>.<run>.s<steps>.gguf)."),
           base: Optional[str] = typer.Option(None, help="Base model, any name --model takes (default: the default model, "
                                                          "if the ledger names it)."),
           run_id: Optional[str] = typer.Option(None, help="Run in the ledger (default: the latest)."),
           step: Optional[str] = StepOpt,
           name: Optional[str] = typer.Option(None, help="general.name of the export (default: the base's name, the task, "
                                                          "the run and its steps)."),
           ollama: Optional[str] = typer.Option(None, "--ollama", help="Also register it with ollama under this name "
                                                                        "(runs `ollama create`; ollama must be on PATH)."),
           threads: int = ThreadsOpt,
           no_check: bool = typer.Option(False, "--no-check", help="Do not check the export (by default it is "
                                                                     "loaded in stock llama-cpp-python, its logits "
                                                                     "compared bit for bit with the trained weights' "
                                                                     "and one chat reply must end)."),
           as_json: bool = JsonOpt):
    """Write the trained model as a named GGUF that llama.cpp, ollama and LM Studio load: every key
    and tensor of the base, the trained codes, a new general.name and qes.* keys (run id, ledger
    head, base sha256, steps), and an ollama Modelfile beside it, then check them before saying done
    (gguf/export_check.py: the Modelfile against the GGUF's chat template, the trained bytes, the
    logits bit for bit, stock llama-cpp-python loading it and ending a reply); a failed check
    removes what was written and exits 1.  Prints the head hash.  --step N or --step best exports an
    earlier point of the run (its qes.steps and qes.ledger_head are then that step's).

    Example: qes-edge export --ledger run.qes --out smollm2-sentiment.gguf --ollama smollm2-sentiment [--step best]"""
    with _json_output(as_json):
        result = _export(ledger, out, base, run_id, name, ollama, threads, check=not no_check, step=step)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"head {result['head']}")


def _export(ledger, out, base, run_id, name, ollama, threads, check: bool = True, step: Optional[str] = None) -> dict:
    import shutil
    import subprocess

    from qes_edge.gguf.export import modelfile_text, write_gguf
    from qes_edge.gguf.check import check_gguf

    if ollama is not None and not ollama.strip():
        _fail("--ollama needs a model name")
    run, base_path, m, tensors, n, head, changed, chosen, out = _rebuild(ledger, run_id, base, threads, out, step)
    meta = check_gguf(base_path).metadata
    base_name = meta.get("general.name") or Path(run.base_name).stem
    title = name or f"{base_name} (qes-edge {run.config.get('task')}, run {run.run_id[:8]}, {n} step{'s' if n != 1 else ''})"
    qes = {"run_id": run.run_id, "ledger_head": head, "base_sha256": run.base_sha256, "steps": n,
           "task": str(run.config.get("task")), "noise_spec": int(run.noise_spec)}
    modelfile = out.with_name(out.name + ".Modelfile")
    try:
        write_gguf(base_path, {t.name: t._array for t in tensors}, out, title, qes)
        from qes_edge.atomic import atomic_output
        with atomic_output(modelfile, "w") as (_tmp, f):
            f.write(modelfile_text(out.name, meta.get("tokenizer.chat_template")))
    except OSError as e:
        _fail(f"cannot write {out}: {e.strerror or e} (nothing was written; the ledger is untouched)")
    common.console.print(f"{n} steps replayed ({chosen}), every weights hash matched; wrote {out} ({title!r}) and "
                         f"{modelfile.name}", highlight=False)
    if not changed:
        common.console.print("note: no code differs from the base model: the export carries the base's weights")
    checked = None
    if check:
        from qes_edge.llama.export_check import ExportCheckFailed, check_export
        from qes_edge.threads import resolve_threads
        try:
            checked = check_export(out, modelfile, base_path, tensors, resolve_threads(threads))
        except ExportCheckFailed as e:
            out.unlink(missing_ok=True)
            modelfile.unlink(missing_ok=True)
            typer.echo(f"error: the export failed its check: {_one_line(e)}; {out.name} and its Modelfile were removed "
                       "(--no-check writes them unchecked)", err=True)
            raise typer.Exit(1)
        for line in checked:
            common.console.print(line, highlight=False, markup=False)
    result = {"out": str(out), "modelfile": str(modelfile), "name": title, "run_id": run.run_id, "steps": n,
              "chosen": chosen, "head": head, "changed": changed, "ollama": None, "checked": checked}
    if ollama:
        exe = shutil.which("ollama")
        if exe is None:
            _fail(f"ollama is not on PATH: where it is installed, run `ollama create {ollama} -f {modelfile}`")
        r = subprocess.run([exe, "create", ollama, "-f", str(modelfile)], cwd=out.parent, capture_output=True, text=True)
        if r.returncode != 0:
            _fail(f"ollama create {ollama} failed: {(r.stderr or r.stdout).strip()}")
        common.console.print(f"ollama: created {ollama}")
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
    common.console.print(f"run {run.run_id}: base {run.base_name} (sha256 {run.base_sha256[:16]}…), {n} steps, "
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
    from qes_edge.atomic import atomic_output, check_output_path
    from qes_edge.ledger.store import canonical_json
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
    common.console.print(f"dumped run {run.run_id}, {n} steps, to {out}", highlight=False)
    typer.echo(f"head {head}")


@app.command("runs")
def list_runs(folder: Optional[Path] = typer.Option(None, "--dir", help="Folder of ledgers (default: <home>/runs, home "
                                                                          "being $QES_EDGE_HOME or the user data folder)."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object per run, a line each.")):
    """List the runs in the ledgers of a folder: model, task, steps, when the last step was
    recorded, head hash; a ledger that does not verify is listed with the reason.

    Example: qes-edge runs --json"""
    from qes_edge.home import runs_dir
    from qes_edge.ledger.store import Ledger, LedgerError
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
        common.console.print(f"no runs in {folder}")
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
    common.console.print(table)
