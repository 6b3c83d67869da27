"""Commands that read a run's record: log and report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qes_edge.cli.common import _fail, app

RunArg = typer.Argument(..., metavar="RUN", help="A ledger file, or a run id (or a unique prefix of 4+ hex digits) "
                                                  "looked up in <home>/runs and the daemon's jobs.")
RunIdOpt = typer.Option(None, "--run-id", help="Run in the ledger, or a unique prefix of its id (default: the latest).")


def _open_run(run: str, run_id: Optional[str]):
    """runlog.open_run, a bad RUN, --run-id or ledger one error line."""
    from qes_edge.ledger.runlog import RunNotFound, open_run
    from qes_edge.ledger.store import LedgerError
    try:
        return open_run(run, run_id)
    except (RunNotFound, LedgerError) as e:
        _fail(str(e))


@app.command("log")
def log(run: str = RunArg,
        run_id: Optional[str] = RunIdOpt,
        tail: Optional[int] = typer.Option(None, "--tail", min=1, help="Only the last N steps (and the evaluations "
                                                                         "from there on)."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per line: the run, then each step and "
                                                           "evaluation (NaN as null).")):
    """Print a verified run one line per step: mean/min/max reward, failed members, the range of
    the Q16 coefficients, the time of each phase (perturb, eval, restore, update, digest) and the
    codes changed, with the held-out evaluations at the steps they were made.

    Example: qes-edge log run.qes --tail 20"""
    from qes_edge.ledger.runlog import human_lines, json_lines, load
    path, lg, r, n = _open_run(run, run_id)
    try:
        record = load(path, lg, r, n, tail)
    finally:
        lg.close()
    for line in (json_lines if as_json else human_lines)(record):
        typer.echo(line)


@app.command("report")
def report(run: str = RunArg,
           out: Path = typer.Option(..., "--out", help="The HTML file to write (self-contained: the figure inlined)."),
           png: Optional[Path] = typer.Option(None, "--png", help="The figure's PNG (default: beside --out, with its "
                                                                  "name and .png)."),
           run_id: Optional[str] = RunIdOpt):
    """Write a one-file HTML report of a verified run (header, config, summary numbers, per-step
    table and the figure inlined) and the figure as a PNG beside it: reward per step with the
    held-out metrics, the step time by phase, and peak memory against the inference baseline.
    Needs matplotlib (pip install 'qes-edge\\[report]').

    Example: qes-edge report run.qes --out report.html"""
    from qes_edge.atomic import check_output_path
    from qes_edge.ledger.runlog import load
    png = png or out.with_suffix(".png")
    if png.resolve() == out.resolve():
        _fail(f"--png {png} is the --out file too: give two different files")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("the report needs matplotlib: pip install 'qes-edge[report]'")
    path, lg, r, n = _open_run(run, run_id)
    try:
        record = load(path, lg, r, n)
    finally:
        lg.close()
    for p in (out, png):
        try:
            check_output_path(p, {"ledger": path})
        except ValueError as e:
            _fail(str(e))
    from qes_edge.agent.report import write_report
    try:
        write_report(record, out, png)
    except OSError as e:
        _fail(f"cannot write {e.filename or out}: {e.strerror or e} (nothing was written there)")
    typer.echo(f"wrote {out} and {png} (run {r.run_id[:8]}, {n} steps)")
