"""The worker of a shared population: `qes-edge worker` evaluates members for a coordinator
(`qes-edge train --peers URL`), keeping the run's weights from its own copy of the ledger
(docs/sync-protocol.md §9)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qes_edge.cli.common import GpuLayersOpt, ModelOpt, _fail, _refuse_directory, app
from qes_edge.sync.defaults import DEFAULT_BAUD


def _check_worker_ledger(ledger: Path) -> None:
    from qes_edge.ledger.store import Ledger, LedgerError
    _refuse_directory(ledger)
    if not ledger.exists():
        if not ledger.parent.is_dir():
            _fail(f"the folder {ledger.parent} does not exist")
        return
    lg = None
    try:
        lg = Ledger(ledger, readonly=True)
        for r in lg.runs():
            lg.verify(r.run_id)
    except LedgerError as e:
        _fail(str(e))
    finally:
        if lg is not None:
            lg.close()


@app.command("worker")
def worker_cmd(on: str = typer.Option(..., "--on", help="Where coordinators connect: socket://HOST:PORT (HOST empty or "
                                                         "0.0.0.0 for every interface, PORT 0 for any free port) or a "
                                                         "serial device (/dev/ttyUSB0)."),
               ledger: Path = typer.Option(..., "--ledger", help="This worker's copy of the run's ledger (created "
                                                                 "when the first run arrives; rows are appended as "
                                                                 "the coordinator sends them)."),
               model: Optional[str] = ModelOpt,
               threads: int = typer.Option(0, "--threads", min=0, help="Threads for llama.cpp and libqes (0: every "
                                                                       "core). Give the coordinator's --threads: "
                                                                       "rewards are bit-identical only then."),
               gpu_layers: str = GpuLayersOpt,
               baud: int = typer.Option(DEFAULT_BAUD, "--baud", min=1, help="Line speed of a serial device (ignored on "
                                                                      "TCP)."),
               once: bool = typer.Option(False, "--once", help="Serve one coordinator, then exit.")):
    """Evaluate population members for a coordinator (`qes-edge train --peers URL`): hold the
    model, bring it to the run's weights from the ledger rows the coordinator sends (each chained
    and its weights hash checked, so every device applies the identical update), score the
    members asked for and send their rewards back.  Prints where it listens, then one line per
    coordinator.  Ctrl-C stops it.

    Example: qes-edge worker --on socket://0.0.0.0:8766 --ledger worker.qes --threads 2"""
    from qes_edge.training.executors.peers import Worker
    from qes_edge.training.opening import model_opener
    from qes_edge.gguf.models import ModelNotFound, resolve_model
    from qes_edge.sync import Listener, LinkError
    try:
        resolve_model(model)
    except ModelNotFound as e:
        _fail(str(e))
    _check_worker_ledger(ledger)
    try:
        listener = Listener(on, baud)
    except LinkError as e:
        _fail(str(e))
    typer.echo(f"listening on {listener.url} (ledger {ledger}); Ctrl-C stops", err=True)
    w = Worker(ledger, model_opener(model, threads, gpu_layers), say=lambda m: typer.echo(m, err=True))
    try:
        w.serve(listener, once=once)
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        w.close()
        listener.close()
