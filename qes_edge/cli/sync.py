"""Commands that keep two devices' ledgers of a run at the same head: sync and sync serve
(docs/sync-protocol.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from qes_edge.cli import common
from qes_edge.cli.common import _fail, _one_line, _refuse_directory, app
from qes_edge.sync.defaults import DEFAULT_BAUD, RETRIES, TIMEOUT_S

sync_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, rich_markup_mode=None)
app.add_typer(sync_app, name="sync")

LedgerOpt = typer.Option(None, "--ledger", help="This device's ledger (created when a run is received into it).")
RunIdOpt = typer.Option(None, "--run-id", help="The run to sync (default: the peer's run, or this ledger's latest).")
BaudOpt = typer.Option(DEFAULT_BAUD, "--baud", min=1, help="Line speed of a serial device (ignored on TCP).")
TimeoutOpt = typer.Option(TIMEOUT_S, "--timeout", min=0.05, help="Seconds without a frame from the peer before a message is "
                                                           "sent again.")
RetriesOpt = typer.Option(RETRIES, "--retries", min=0, help="Timeouts in a row, and reconnections after a dropped link, "
                                                      "before giving up (what was received is kept).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output: one JSON object per sync or session on stdout.")


def _check_ledger(ledger: Optional[Path], run_id: Optional[str]) -> Path:
    """Bad input is refused before the link is opened: a folder, a foreign or damaged ledger, a
    run that does not verify; a ledger that does not exist yet is created only when a run comes."""
    from qes_edge.ledger.store import Ledger, LedgerError
    if ledger is None:
        _fail("--ledger is needed: this device's ledger (it is created when a run is received)")
    _refuse_directory(ledger)
    if not ledger.exists():
        if not ledger.parent.is_dir():
            _fail(f"the folder {ledger.parent} does not exist")
        return ledger
    lg = None
    try:
        lg = Ledger(ledger, readonly=True)
        runs = [r.run_id for r in lg.runs()]
        for rid in ([run_id] if run_id in runs else runs[-1:] if run_id is None else []):
            lg.verify(rid)
    except LedgerError as e:
        _fail(str(e))
    finally:
        if lg is not None:
            lg.close()
    return ledger


def _check_run_id(run_id: Optional[str]) -> None:
    if run_id is not None and (len(run_id) != 32 or any(c not in "0123456789abcdef" for c in run_id)):
        _fail(f"--run-id {run_id!r} is not a run id (32 lowercase hex digits)")


def _opts(timeout: float, retries: int):
    from qes_edge.sync import Options
    return Options(timeout=timeout, retries=retries)


def _exit_for(e) -> None:
    """One line on stderr; exit 1 (the link failed: run it again), 2 (refused), 3 (a fork)."""
    typer.echo(f"error: {_one_line(e)}", err=True)
    raise typer.Exit(e.exit_code)


@sync_app.callback()
def sync_cmd(ctx: typer.Context,
             ledger: Optional[Path] = LedgerOpt,
             peer: Optional[str] = typer.Option(None, "--peer", help="The peer running `qes-edge sync serve`: "
                                                                      "socket://HOST:PORT, a serial device "
                                                                      "(/dev/ttyUSB0) or another pyserial URL."),
             run_id: Optional[str] = RunIdOpt,
             baud: int = BaudOpt,
             timeout: float = TimeoutOpt,
             retries: int = RetriesOpt,
             as_json: bool = JsonOpt):
    """Bring this ledger and a peer's to the same head: only the missing steps cross the wire,
    each checked against the hash chain as it arrives and committed on its own.  The side that is
    behind receives (into a new ledger too); a fork (both extended the run) is reported and
    nothing is written (exit 3); a peer with another base model, noise spec or protocol is
    refused, naming which (exit 2); a link that fails keeps what came (exit 1: run it again).

    Example: qes-edge sync --ledger run.qes --peer socket://jetson.local:8765"""
    if ctx.invoked_subcommand is not None:
        return
    from qes_edge.sync import SyncError, sync
    if peer is None or not peer.strip():
        _fail("sync needs --peer (socket://HOST:PORT or a serial device), or `qes-edge sync serve` to answer")
    _check_run_id(run_id)
    ledger = _check_ledger(ledger, run_id)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("sync"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), console=common.make_console(stderr=True), transient=True)
    task = None

    def progress(n: int, total: int) -> None:  # a bar on stderr while steps come in
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("sync", total=total)
        bar.update(task, completed=n, total=total)
    try:
        result = sync(peer, ledger, run_id, _opts(timeout, retries), progress=None if as_json else progress,
                      baudrate=baud)
    except SyncError as e:
        _exit_for(e)
    finally:
        if task is not None:
            bar.stop()
    typer.echo(json.dumps(result.to_json()) if as_json else result.line())


@sync_app.command("serve")
def serve_cmd(ledger: Optional[Path] = LedgerOpt,
              on: str = typer.Option(..., "--on", help="Where to answer: socket://HOST:PORT (HOST empty or 0.0.0.0 "
                                                       "for every interface, PORT 0 for any free port), or a serial "
                                                       "device (/dev/ttyUSB0)."),
              run_id: Optional[str] = typer.Option(None, "--run-id", help="The run offered to a peer that holds none "
                                                                         "(default: the latest; a peer that names a "
                                                                         "run this ledger holds gets that one)."),
              baud: int = BaudOpt,
              timeout: float = TimeoutOpt,
              retries: int = RetriesOpt,
              once: bool = typer.Option(False, "--once", help="Answer one session, then exit with its outcome."),
              as_json: bool = JsonOpt):
    """Answer `qes-edge sync` from peers, one session after another: send the steps a peer lacks,
    receive the steps it has that this ledger lacks (the ledger may keep training meanwhile).
    Prints where it listens, then one line per session.

    Example: qes-edge sync serve --ledger run.qes --on socket://0.0.0.0:8765"""
    from qes_edge.sync import Listener, LinkError, SyncError, serve
    _check_run_id(run_id)
    ledger = _check_ledger(ledger, run_id)
    try:
        listener = Listener(on, baud)
    except LinkError as e:
        _fail(str(e))
    typer.echo(f"listening on {listener.url} (ledger {ledger}); Ctrl-C stops", err=True)

    def report(r) -> None:
        if as_json:
            typer.echo(json.dumps(r.to_json()))
        elif r.error:
            typer.echo(f"{r.peer}: {r.action}: {_one_line(r.error)}")
        else:
            typer.echo(r.line())

    try:
        last = serve(listener, ledger, run_id, _opts(timeout, retries), once=once, on_session=report)
    except SyncError as e:
        _exit_for(e)
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
        raise typer.Exit(0)
    finally:
        listener.close()
    if once and last is not None and last.exit_code:
        raise typer.Exit(last.exit_code)


def _follow_gpu_layers(value: str) -> int:
    """follow --gpu-layers: the layers' tensors go to libqes's CUDA backend (no llama.cpp here)."""
    from qes_edge.llama.placement import parse_gpu_layers
    from qes_edge.native import binding as _native
    try:
        n = parse_gpu_layers(value)
    except ValueError as e:
        _fail(str(e))
    if n and not _native.lib.qes_backend_available(_native.BACKENDS["cuda"]):
        why = "not compiled into this libqes" if not _native.lib.qes_backend_compiled(_native.BACKENDS["cuda"]) \
            else "compiled in, but no CUDA device is usable here"
        _fail(f"--gpu-layers {value}: libqes's CUDA backend is {why}; leave --gpu-layers out to follow on the CPU")
    return n


@app.command("follow")
def follow_cmd(peer: Optional[str] = typer.Option(None, "--peer", help="The peer serving the run: `qes-edge sync "
                                                                         "serve` or `qes-edge daemon run --serve` "
                                                                         "(socket://HOST:PORT or a serial device)."),
               out: Optional[Path] = typer.Option(None, "--out", help="The GGUF kept current (rewritten atomically "
                                                                      "after each batch of new steps)."),
               ledger: Optional[Path] = typer.Option(None, "--ledger", help="The local copy of the run's ledger "
                                                                            "(default: beside --out, <out>.qes)."),
               base: Optional[str] = typer.Option(None, "--base", help="Base model, any name --model takes (default: "
                                                                       "the default model, if the run names it)."),
               run_id: Optional[str] = RunIdOpt,
               interval: float = typer.Option(5.0, "--interval", min=0.05, help="Seconds between syncs once caught "
                                                                                 "up."),
               once: bool = typer.Option(False, "--once", help="Catch up, write the GGUF, and exit."),
               baud: int = BaudOpt,
               timeout: float = TimeoutOpt,
               retries: int = RetriesOpt,
               threads: int = typer.Option(0, "--threads", min=0, help="Threads for the replay (0: all cores)."),
               gpu_layers: str = typer.Option("0", "--gpu-layers", metavar="N|all", callback=_follow_gpu_layers,
                                              help="Hold and update the last N layers' tensors (all: every one) in "
                                                   "GPU memory, with libqes's CUDA backend: the layers llama.cpp "
                                                   "offloads with the same --gpu-layers. The GGUF written is the same."),
               as_json: bool = JsonOpt):
    """Keep a replayed copy of a peer's run current: sync its new steps into a local ledger
    (each checked against the hash chain), replay each onto the base model's codes in memory
    (each weights hash checked), and rewrite the GGUF atomically after each batch, so that it
    is always a complete earlier or later version.  Prints each step's replay time against its
    recorded training time.  A peer that cannot be reached is waited for (a warning each
    --interval).  Ctrl-C or SIGTERM stops it cleanly.  Exit 1 when a step does not
    replay to its recorded weights (or the link failed with --once), 2 refused, 3 a fork.

    Example: qes-edge follow --peer socket://jetson.local:8765 --out follow.gguf"""
    import signal
    import threading

    from qes_edge.atomic import check_output_path
    from qes_edge.sync import SyncError
    from qes_edge.training.follow import FollowError, follow
    if peer is None or not peer.strip():
        _fail("follow needs --peer: the device serving the run (socket://HOST:PORT or a serial device)")
    if out is None:
        _fail("follow needs --out: the GGUF to keep current")
    _check_run_id(run_id)
    if ledger is None:
        ledger = out.with_name(out.name + ".qes")
    try:
        check_output_path(out, {"ledger": ledger})
    except ValueError as e:
        _fail(str(e))
    if out.suffix == ".qes" or out.resolve() == ledger.resolve():
        _fail(f"--out {out}: a ledger's name; give a .gguf file name")
    ledger = _check_ledger(ledger, run_id)
    if base is not None:
        from qes_edge.gguf.models import ModelNotFound, resolve_model
        try:
            resolve_model(base)
        except (ModelNotFound, ValueError) as e:
            _fail(str(e))

    stop = threading.Event()
    said: list = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    def on_step(st) -> None:
        if as_json:
            typer.echo(json.dumps(st.to_json()))
        else:
            train = f"{st.train_s:.3f} s" if st.train_s else "not recorded"
            ratio = f" ({100 * st.ratio:.2f}%)" if st.ratio is not None else ""
            typer.echo(f"step {st.step}: replay {st.replay_s:.3f} s, training {train}{ratio}")

    def on_batch(b) -> None:
        said.clear()
        if as_json:
            typer.echo(json.dumps({"event": "batch", "first": b.first, "last": b.last, "n_steps": b.n_steps,
                                   "head": b.head, "write_s": round(b.write_s, 3), "sync_s": round(b.sync_s, 3),
                                   "out": str(out)}))
        else:
            typer.echo(b.line(out))

    def on_sync_error(e) -> None:  # once per cause, not at every --interval
        line = _one_line(e)
        key = line.split(";")[0]
        if not said or said[-1] != key:
            typer.echo(f"warning: {line}", err=True)
        said[:] = [key]

    f = None
    try:
        f = follow(peer, ledger, out, base, run_id, interval, once, _opts(timeout, retries), baud, threads,
                   gpu_layers, stop, on_batch=on_batch, on_step=on_step, on_sync_error=on_sync_error)
    except FollowError as e:
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(e.exit_code)
    except SyncError as e:
        _exit_for(e)
    except KeyboardInterrupt:
        typer.echo(f"stopped; {out} is complete" + ("" if out.exists() else " (none was written yet)"), err=True)
        raise typer.Exit(0)
    if as_json:
        typer.echo(json.dumps({"event": "summary", **f.summary()}))
    else:
        s = f.summary()
        if s["ratio"] is not None:
            typer.echo(f"{s['steps']} steps followed: replay {s['replay_s']:.3f} s, "
                       f"{100 * s['ratio']:.2f}% of training {s['train_s']:.2f} s (worst step "
                       f"{100 * s['max_ratio']:.2f}%)")


@app.command("branch")
def branch_cmd(ledger: Path = typer.Option(..., "--ledger", help="The ledger that holds the run to continue."),
               run_id: Optional[str] = typer.Option(None, "--run-id", help="The run to continue (default: the "
                                                                          "latest)."),
               steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Continue after the run's first N "
                                                                               "steps (default: all of them)."),
               as_json: bool = JsonOpt):
    """Continue a run as a new run that names its parent, in the same ledger: the way to keep both
    sides of a fork.  The new run's first steps are the parent's, copied and chained anew under
    its own id, and its config records parent = {run_id, steps, head}; being the ledger's latest
    run, it is the one that train, sync and the daemon continue.  Replaying it gives the parent's
    weights at that step, then its own.

    Example: qes-edge branch --ledger run.qes (after sync reported a fork; the other device can
    then take the new run into a ledger of its own with sync --run-id)"""
    from qes_edge.cli.common import _open_ledger_readonly
    from qes_edge.ledger.store import Ledger, LedgerError
    _check_run_id(run_id)
    lg, parent, _ = _open_ledger_readonly(ledger, run_id)  # a file that is no ledger stays as it was
    lg.close()
    lg = None
    try:
        lg = Ledger(ledger)
        child = lg.branch(parent.run_id, steps)
        n = lg.verify(child.run_id)
        head = lg.head_hash(child.run_id)
    except LedgerError as e:
        _fail(str(e))
    finally:
        if lg is not None:
            lg.close()
    info = child.config["parent"]
    if as_json:
        typer.echo(json.dumps({"run_id": child.run_id, "parent": info, "steps": n, "head": head}))
        return
    where = f"after its step {info['steps'] - 1}" if info["steps"] else "from its start"
    typer.echo(f"run {child.run_id}: continues run {parent.run_id} {where} (head {info['head'][:16]}…); "
               f"{n} steps copied, head {head}")
