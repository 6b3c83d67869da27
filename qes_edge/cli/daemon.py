"""Commands of the overnight agent: queue, daemon and status."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from qes_edge.cli import common
from qes_edge.cli.common import JsonOpt, ThreadsOpt, _explicit, _fail, _refuse_directory, _user_errors, app

queue_app = typer.Typer(rich_markup_mode=None, help="The daemon's queue of runs: add takes train's options.\n\n"
                        "Example: qes-edge queue add --task choice --data quiz.jsonl --steps 200", no_args_is_help=True)
daemon_app = typer.Typer(rich_markup_mode=None, help="The overnight agent: trains the queued runs in the background, pausing on battery or "
                         "heat, resuming after a crash or a reboot.\n\nExample: qes-edge daemon start --stop-at 07:00",
                         no_args_is_help=True)
app.add_typer(queue_app, name="queue")
app.add_typer(daemon_app, name="daemon")


def _home() -> Path:
    from qes_edge.home import home
    return home()


def _db():
    from qes_edge.agent.daemon import daemon_paths
    from qes_edge.agent.db import DaemonDB
    return DaemonDB(daemon_paths(_home())["db"])


# -- queue ----------------------------------------------------------------------------------

@queue_app.command("add", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def queue_add(ctx: typer.Context):
    """Queue a run for the daemon.  It takes the options of `qes-edge train` (see `qes-edge train
    --help`), checked now as train checks them before loading the model; paths are stored
    absolute, so the daemon finds them from any folder.

    Example: qes-edge queue add --task choice --data capitals.jsonl --steps 200"""
    from typer.main import get_command

    from qes_edge.ledger.store import Ledger, LedgerError
    from qes_edge.training.opening import check_data_option, differences, trainable_model
    from qes_edge.training.session import RUN_OPTIONS
    from qes_edge.home import default_ledger
    from qes_edge.training.config import TrainConfig

    train_cmd = get_command(app).commands["train"]
    sub = train_cmd.make_context("qes-edge queue add", list(ctx.args))  # click's own checks and messages
    p = sub.params
    if p["print_config"]:
        from qes_edge.cli.train import _print_config
        _print_config(sub)
        return
    if p["as_json"]:
        _fail("--json is for the foreground train; the daemon's progress is `qes-edge status --json`")
    with _user_errors():
        data = check_data_option(p["data"])
        cfg = TrainConfig.from_options({**p, "data": data})
        try:
            cfg.validate()
        except ValueError as e:
            _fail(str(e))
        if p["resume"] and p["new_run"]:
            _fail("--resume continues the ledger's run and --new-run starts another: give one of them")
        from qes_edge.cli.common import check_executor_options, peer_urls
        check_executor_options(p["peers"], p["ray"])
        peers = None
        if p["peers"] is not None:  # checked now, opened by the daemon when the job starts
            peers = peer_urls(p["peers"])
            from qes_edge.sync.link import LinkError, _tcp_address
            for u in peers:
                if u.startswith("socket://"):
                    try:
                        _tcp_address(u)
                    except LinkError as e:
                        _fail(f"--peers: {e}")
        model = trainable_model(p["model"], cfg.frozen).resolve()
    ledger = (Path(p["ledger"]).expanduser().absolute() if p["ledger"] else default_ledger(model, cfg.task, cfg.seed))
    explicit = _explicit(sub, RUN_OPTIONS)
    _refuse_directory(ledger)
    if ledger.is_file() and not p["new_run"]:
        try:
            lg = Ledger(ledger, readonly=True)
            try:
                runs = lg.runs()
                if runs:
                    differ = differences(cfg.record(), runs[-1].config, explicit)
                    if differ and not p["resume"]:
                        _fail(f"{ledger} holds run {runs[-1].run_id[:8]}, recorded with other options: "
                              f"{'; '.join(differ)}; leave them out, or add --resume or --new-run")
            finally:
                lg.close()
        except LedgerError as e:
            _fail(str(e))
    db = _db()
    try:
        for j in db.jobs(("queued", "running")):
            if Path(j.ledger) == ledger:
                _fail(f"job {j.id} ({j.state}) already trains {ledger}: remove it (qes-edge queue remove {j.id}) "
                      "or give another --ledger")
        options = {"cfg": asdict(cfg), "explicit": explicit, "resume": p["resume"], "new_run": p["new_run"],
                   "threads": p["threads"], "gpu_layers": p["gpu_layers"], "peers": peers, "ray": p["ray"], "args": list(ctx.args)}
        job_id = db.add_job(options, p["steps"], p["eval_every"], str(ledger), str(model), cfg.task)
        db.event("queue", f"job {job_id} queued: {model.name} task {cfg.task} to step {p['steps']}", job_id)
    finally:
        db.close()
    from qes_edge.agent.daemon import daemon_paths, running_pid
    running = running_pid(daemon_paths(_home())["lock"])
    common.console.print(f"queued job {job_id}: {model.name}, task {cfg.task}, {p['steps']} steps, ledger {ledger}"
                         + ("" if running else " (no daemon runs: `qes-edge daemon start`)"), markup=False, highlight=False)


@queue_app.command("list")
def queue_list(as_json: bool = JsonOpt):
    """The queued, running and finished jobs.

    Example: qes-edge queue list --json"""
    import json
    db = _db()
    try:
        jobs = db.jobs()
    finally:
        db.close()
    if as_json:
        for j in jobs:
            typer.echo(json.dumps({**asdict(j), "options": {k: v for k, v in j.options.items() if k != "cfg"}}))
        return
    if not jobs:
        common.console.print("the queue is empty")
    for j in jobs:
        common.console.print(f"#{j.id} {j.state:8} {Path(j.model).name} task {j.task} to step {j.steps}  {j.ledger}"
                             + (f"  — {j.error}" if j.error else ""), markup=False, highlight=False)


@queue_app.command("remove")
def queue_remove(job_id: int = typer.Argument(..., help="The job's number (queue list).")):
    """Remove a queued job (its ledger, if it has one, is kept).  A running job is stopped with
    `qes-edge daemon stop` first.

    Example: qes-edge queue remove 3"""
    db = _db()
    try:
        j = db.job(job_id)
        if j is None:
            _fail(f"no job {job_id} in the queue")
        if j.state == "running":
            from qes_edge.agent.daemon import daemon_paths, running_pid
            if running_pid(daemon_paths(_home())["lock"]) is not None:
                _fail(f"job {job_id} is running: stop the daemon first (qes-edge daemon stop)")
        db.set_job(job_id, state="removed")
        db.event("queue", f"job {job_id} removed", job_id)
    finally:
        db.close()
    common.console.print(f"removed job {job_id}")


# -- daemon -----------------------------------------------------------------------------------

MaxSteps = typer.Option(None, "--max-steps", min=1, help="Stop after training this many steps (all jobs together).")
MaxWall = typer.Option(None, "--max-wall", help="Stop after this long: seconds, or 45m, 8h, 1h30m.")
StopAt = typer.Option(None, "--stop-at", help="Stop at this local clock time (HH:MM, 24 h), e.g. 07:00.")
OnBattery = typer.Option(False, "--run-on-battery", help="Keep training on battery (default: pause until plugged in).")
MaxTemp = typer.Option(85.0, "--max-temp", help="Pause while any thermal zone is above this (°C); resume 5 °C below.")
Nice = typer.Option(None, "--nice", min=0, max=19, help="CPU niceness of the daemon (0..19; 10 is a good neighbour).")
IONice = typer.Option(None, "--ionice", help="IO priority: idle, best-effort or best-effort:N (0..7).")
Poll = typer.Option(30.0, "--poll", min=0.05, help="Seconds between looks at an empty queue or a paused machine.")
Serve = typer.Option(None, "--serve", help="While training, answer `qes-edge sync` and `qes-edge follow` peers "
                                           "with the current job's ledger (read-only) on socket://HOST:PORT or a "
                                           "serial device.")


def _daemon_config(max_steps, max_wall, stop_at, run_on_battery, max_temp, nice, ionice, poll, threads,
                   exit_when_empty=False, serve=None):
    from qes_edge.agent.daemon import DaemonConfig, parse_clock, parse_duration
    from qes_edge.agent.manners import parse_ionice
    try:
        wall = parse_duration(max_wall) if max_wall else None
        at = parse_clock(stop_at) if stop_at else None
        if ionice:
            parse_ionice(ionice)
        if serve is not None and not serve.strip():
            raise ValueError("--serve needs socket://HOST:PORT or a serial device")
        if serve is not None and serve.startswith("socket://"):
            from qes_edge.sync.link import LinkError, _tcp_address
            try:
                _tcp_address(serve)
            except LinkError as e:
                raise ValueError(f"--serve: {e}") from None
    except ValueError as e:
        _fail(str(e))
    return DaemonConfig(max_steps=max_steps, max_wall_s=wall, stop_at=at, pause_on_battery=not run_on_battery,
                        max_temp_c=max_temp, nice=nice, ionice=ionice, poll_s=poll, exit_when_empty=exit_when_empty,
                        threads=threads, serve=serve)


@daemon_app.command("run")
def daemon_run(max_steps: Optional[int] = MaxSteps, max_wall: Optional[str] = MaxWall,
               stop_at: Optional[str] = StopAt, run_on_battery: bool = OnBattery, max_temp: float = MaxTemp,
               nice: Optional[int] = Nice, ionice: Optional[str] = IONice, poll: float = Poll,
               threads: int = ThreadsOpt,
               exit_when_empty: bool = typer.Option(False, "--exit-when-empty", help="Exit once the queue is empty."),
               serve: Optional[str] = Serve):
    """Run the daemon in the foreground (what `daemon start` and the systemd unit run): log lines
    on stderr and in <home>/daemon.log.

    Example: qes-edge daemon run --exit-when-empty"""
    from qes_edge.agent.daemon import Daemon, DaemonError
    cfg = _daemon_config(max_steps, max_wall, stop_at, run_on_battery, max_temp, nice, ionice, poll, threads,
                         exit_when_empty, serve)
    try:
        code = Daemon(_home(), cfg).run()
    except DaemonError as e:
        _fail(str(e))
    raise typer.Exit(code)


@daemon_app.command("start")
def daemon_start(max_steps: Optional[int] = MaxSteps, max_wall: Optional[str] = MaxWall,
                 stop_at: Optional[str] = StopAt, run_on_battery: bool = OnBattery, max_temp: float = MaxTemp,
                 nice: Optional[int] = Nice, ionice: Optional[str] = IONice, poll: float = Poll,
                 threads: int = ThreadsOpt, serve: Optional[str] = Serve):
    """Start the daemon in the background: it trains the queued runs one after another, pausing
    on battery or heat, until the queue is empty (it then waits for more) or a budget ends.

    Example: qes-edge daemon start --stop-at 07:00 --nice 10"""
    from qes_edge.agent.daemon import DaemonError, daemon_paths, running_pid, start_detached
    _daemon_config(max_steps, max_wall, stop_at, run_on_battery, max_temp, nice, ionice, poll, threads,
                   serve=serve)  # checks
    home = _home()
    pid = running_pid(daemon_paths(home)["lock"])
    if pid is not None:
        _fail(f"a daemon (pid {pid}) is already running on {home}")
    argv = [sys.executable, "-m", "qes_edge", "daemon", "run", "--max-temp", str(max_temp), "--poll", str(poll),
            "--threads", str(threads)]
    for flag, v in (("--max-steps", max_steps), ("--max-wall", max_wall), ("--stop-at", stop_at), ("--nice", nice),
                    ("--ionice", ionice), ("--serve", serve)):
        if v is not None:
            argv += [flag, str(v)]
    if run_on_battery:
        argv.append("--run-on-battery")
    try:
        pid = start_detached(argv, home)
    except DaemonError as e:
        _fail(str(e))
    common.console.print(f"daemon started (pid {pid}); log {daemon_paths(home)['log']}; `qes-edge status` shows its progress",
                         markup=False, highlight=False)


@daemon_app.command("stop")
def daemon_stop(timeout: float = typer.Option(120.0, help="Seconds to wait for the step in flight to be abandoned.")):
    """Stop the daemon: the step in flight is abandoned (nothing half-written) and the run
    resumes there at the next start.

    Example: qes-edge daemon stop"""
    from qes_edge.agent.daemon import DaemonError, stop_daemon
    try:
        pid = stop_daemon(_home(), timeout)
    except DaemonError as e:
        _fail(str(e))
    common.console.print("no daemon was running" if pid is None else f"daemon (pid {pid}) stopped")


@daemon_app.command("status")
def daemon_status(as_json: bool = JsonOpt):
    """The same as `qes-edge status`.

    Example: qes-edge daemon status --json"""
    status(as_json)


@daemon_app.command("install")
def daemon_install(nice: Optional[int] = typer.Option(10, "--nice", min=0, max=19, help="CPU niceness in the unit."),
                   dry_run: bool = typer.Option(False, "--dry-run", help="Print the unit file, write nothing.")):
    """Start the daemon at login: a systemd user unit (Linux) or a launchd agent (macOS).

    Example: qes-edge daemon install --dry-run"""
    import platform

    from qes_edge.agent.service import install, launchd_plist, systemd_unit
    exe = [sys.executable, "-m", "qes_edge"]
    home = _home()
    if dry_run:
        text = (launchd_plist if platform.system() == "Darwin" else systemd_unit)(exe, home, nice=nice)
        typer.echo(text)
        return
    try:
        result = install(exe, home, nice=nice)
    except (ValueError, OSError) as e:
        _fail(str(e))
    common.console.print(str(result), markup=False, highlight=False)


# -- status ---------------------------------------------------------------------------------------

@app.command()
def status(as_json: bool = JsonOpt):
    """What the daemon is doing: the run it trains (step, reward and held-out curves, ETA), its
    pauses, memory and queue.  Safe to run while the daemon writes.

    Example: qes-edge status --json"""
    from qes_edge.agent.status import as_json as to_json, collect, render
    info = collect(_home())
    if as_json:
        typer.echo(to_json(info))
    else:
        render(info, common.console)
