"""The overnight agent: trains the queued runs one after another, unattended, losing nothing.

One daemon per home (`<home>/daemon.lock`, an flock that dies with the process: a daemon killed
with -9 leaves no stale lock).  It takes the next job from `<home>/daemon.db` (an interrupted
one first), opens it through the session (which rebuilds the working weights from base +
ledger and checks every recorded hash), and trains it step by step.  Between steps it asks
the gate: the budgets (steps, wall time, a clock time) and the manners (battery, heat), pausing
while the machine is on battery or hot and resuming after.  SIGTERM or SIGINT abandons the step
in flight between two members (the weights restored, nothing recorded), checks the weights
against the last recorded hash, and exits; a second SIGINT exits at once.  Every start, stop,
pause, resume and error is a line in `<home>/daemon.log` and a row in daemon.db's events.

Crashes are handled by the ledger, not by the daemon: a step is one SQLite transaction, so
after kill -9 or a power cut the next start resumes from the last recorded step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qes_edge.agent.db import DaemonDB, Job
from qes_edge.home import DAEMON_DB, ENV as HOME_ENV

LOG = logging.getLogger("qes_edge.daemon")


class DaemonError(Exception):
    """A daemon that cannot start (another one runs, a bad option): one line."""


def daemon_paths(home: Path) -> dict[str, Path]:
    return {"db": home / DAEMON_DB, "lock": home / "daemon.lock", "log": home / "daemon.log",
            "out": home / "daemon.out"}


# -- the lock -----------------------------------------------------------------------------

class HomeLock:
    """An exclusive flock on `<home>/daemon.lock`, holding the daemon's pid."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = running_pid(self.path)
            raise DaemonError(f"another qes-edge daemon{f' (pid {pid})' if pid else ''} is running on "
                              f"{self.path.parent}: stop it with `qes-edge daemon stop`, or give another "
                              f"{HOME_ENV}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def running_pid(lock_path: Path) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon holds it."""
    if not lock_path.exists():
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a daemon runs
            text = lock_path.read_text().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- budgets --------------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """'90', '90s', '45m', '8h', '1h30m' -> seconds."""
    import re
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"cannot read the duration {text!r}: use seconds or forms like 45m, 8h, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parse_clock(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """'07:00' -> the next 07:00 local time after `now`."""
    now = now or dt.datetime.now()
    try:
        t = dt.datetime.strptime(text.strip(), "%H:%M").time()
    except ValueError:
        raise ValueError(f"cannot read the clock time {text!r}: use HH:MM (24 h), e.g. 07:00") from None
    at = dt.datetime.combine(now.date(), t)
    return at if at > now else at + dt.timedelta(days=1)


@dataclass
class DaemonConfig:
    max_steps: int | None = None          # steps this daemon trains before it stops
    max_wall_s: float | None = None       # seconds this daemon runs before it stops
    stop_at: dt.datetime | None = None    # a clock time at which it stops
    pause_on_battery: bool = True
    max_temp_c: float | None = 85.0
    nice: int | None = None
    ionice: str | None = None
    poll_s: float = 30.0                  # how often an idle or paused daemon looks again
    exit_when_empty: bool = False
    threads: int = 0
    serve: str | None = None              # socket://HOST:PORT or a serial device: serve the job's ledger there


# -- the daemon -----------------------------------------------------------------------------

def _pause_kind(reason: str) -> str:
    """A pause is logged when it starts and when its cause changes (battery, heat), not each
    time a temperature moves."""
    return "battery" if reason.startswith("on battery") else "heat"


class Daemon:
    def __init__(self, home: Path, cfg: DaemonConfig):
        from qes_edge.agent.manners import Manners
        self.home, self.cfg = Path(home), cfg
        self.paths = daemon_paths(self.home)
        self.stop = threading.Event()
        self.manners = Manners.from_env(cfg.pause_on_battery, cfg.max_temp_c)
        self.started = time.time()
        self.steps_done = 0
        self.db: DaemonDB | None = None
        self.lock = HomeLock(self.paths["lock"])
        self.paused: str | None = None
        self._paused_since = 0.0
        self.serving: Path | None = None  # the ledger the sync server offers (the current or last job's)
        self._listener = None
        self._server: threading.Thread | None = None

    # -- logging ----------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        for h in list(LOG.handlers):
            LOG.removeHandler(h)
        fh = logging.FileHandler(self.paths["log"], encoding="utf-8")
        fh.setFormatter(fmt)
        LOG.addHandler(fh)
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        LOG.addHandler(sh)

    def note(self, kind: str, message: str, job_id: int | None = None, level=logging.INFO, **data) -> None:
        """A log line and an event row (the row is best effort: a full disk must not hide the line)."""
        LOG.log(level, message)
        try:
            self.db.event(kind, message, job_id, **data)
        except Exception as e:  # noqa: BLE001 - the log line above is what matters
            LOG.error(f"could not record the event in {self.paths['db']}: {e}")

    def _state(self, **values) -> None:
        try:
            self.db.set_state(**values)
        except Exception as e:  # noqa: BLE001
            LOG.error(f"could not update the daemon state: {e}")

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: now
        self.stop.set()
        LOG.info(f"{name} received: finishing cleanly (the step in flight is abandoned, nothing half-written)")

    # -- the gate between steps ------------------------------------------------------------
    def budget_reason(self) -> str | None:
        c = self.cfg
        if c.max_steps is not None and self.steps_done >= c.max_steps:
            return f"budget: {self.steps_done} steps trained (--max-steps {c.max_steps})"
        if c.max_wall_s is not None and time.time() - self.started >= c.max_wall_s:
            return f"budget: {time.time() - self.started:.0f} s of wall time (--max-wall {c.max_wall_s:.0f} s)"
        if c.stop_at is not None and dt.datetime.now() >= c.stop_at:
            return f"budget: it is past {c.stop_at:%H:%M} (--stop-at)"
        return None

    def gate(self, job_id: int | None = None) -> str | None:
        """None to train the next step; a reason to stop.  Blocks while the machine asks for a pause."""
        while True:
            if self.stop.is_set():
                return "stop requested"
            reason = self.budget_reason()
            if reason:
                return reason
            pause = self.manners.reason_to_pause()
            if pause is None:
                if self.paused is not None:
                    took = time.time() - self._paused_since
                    self.note("resume", f"resume after a {took:.0f} s pause ({self.paused})", job_id,
                              reason=self.paused, seconds=round(took, 1))
                    self.paused = None
                    self._state(status="training", pause_reason=None)
                return None
            if self.paused is None or _pause_kind(pause) != _pause_kind(self.paused):
                if self.paused is None:
                    self._paused_since = time.time()
                self.note("pause", f"pause: {pause}", job_id, reason=pause)
                self._state(status="paused", pause_reason=pause, paused_since=self._paused_since)
            self.paused = pause
            self.stop.wait(self.cfg.poll_s)

    # -- running jobs ------------------------------------------------------------------------
    def run(self) -> int:
        """The daemon's life: 0 after a clean stop (signal, budget, empty queue with
        exit_when_empty), 1 when it stopped on an error that needs the user (a full disk)."""
        self.lock.acquire()  # DaemonError when another daemon runs
        try:
            self.db = DaemonDB(self.paths["db"])
            self._setup_logging()
            if self.cfg.serve:
                self._start_server()  # DaemonError when it cannot listen: before anything is trained
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            applied = []
            if self.cfg.nice is not None or self.cfg.ionice:
                from qes_edge.agent.manners import be_nice
                applied = be_nice(self.cfg.nice, self.cfg.ionice)
            self.note("start", f"daemon started (pid {os.getpid()}, home {self.home})"
                      + (f"; {'; '.join(applied)}" if applied else ""), pid=os.getpid())
            self._state(pid=os.getpid(), started=self.started, status="starting", job=None, pause_reason=None,
                        budget={"max_steps": self.cfg.max_steps, "max_wall_s": self.cfg.max_wall_s,
                                "stop_at": self.cfg.stop_at.isoformat() if self.cfg.stop_at else None})
            code = self._loop()
            self.note("stop", f"daemon stopped: {self._stop_reason}", reason=self._stop_reason)
            self._state(status="stopped", stopped=time.time(), stop_reason=self._stop_reason, job=None)
            return code
        finally:
            self._stop_server()
            if self.db is not None:
                self.db.close()
            self.lock.release()

    # -- serving the ledger while training -------------------------------------------------------
    def _start_server(self) -> None:
        """`qes-edge sync` / `qes-edge follow` peers are answered from a thread of their own: it
        reads the ledger through its own read-only connection (SQLite WAL: readers never block
        the writer), only sends (a peer that asks it to pull is refused), and whatever happens
        to it is logged and never reaches the training loop."""
        from qes_edge.sync import Listener, LinkError
        try:
            self._listener = Listener(self.cfg.serve)
        except LinkError as e:
            raise DaemonError(f"--serve: {e}") from None
        done = [j for j in self.db.jobs() if j.state == "done" and Path(j.ledger).exists()]
        self.serving = Path(done[-1].ledger) if done else None  # until a job starts: the last finished one
        self._server = threading.Thread(target=self._serve_loop, name="qes-sync-serve", daemon=True)
        self._server.start()
        self.note("info", f"serving the ledger of the current job on {self._listener.url} (read-only)",
                  url=self._listener.url)
        self._state(serving=self._listener.url)

    def _serve_loop(self) -> None:
        from qes_edge.sync import Options, serve
        opts = Options()
        while not self.stop.is_set():
            try:
                serve(self._listener, lambda: self.serving, None, opts, stop=self.stop.is_set, readonly=True,
                      on_session=self._served)
                return
            except Exception as e:  # noqa: BLE001 - the server must never take the daemon down
                if self.stop.is_set():
                    return
                LOG.warning(f"sync server: {type(e).__name__}: {e}; serving again")
                self.stop.wait(1.0)

    def _served(self, r) -> None:
        if r.error and "no run to offer yet" in r.error:
            return  # a follower waiting for the job's run: not worth a line each time it asks
        if r.error:
            LOG.info(f"sync server: {r.peer}: {r.action}: {r.error}")
        elif r.first is not None:
            LOG.info(f"sync server: {r.line()}")

    def _stop_server(self) -> None:
        if self._server is not None:
            self.stop.set()
            self._server.join(timeout=5.0)
            self._server = None
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:  # noqa: BLE001
                pass
            self._listener = None

    _stop_reason = ""

    def _loop(self) -> int:
        from qes_edge.training.session import current_rss_mb
        idle_noted = False
        while True:
            reason = "stop requested" if self.stop.is_set() else self.budget_reason()
            if reason:
                self._stop_reason = reason
                return 0
            job = self.db.next_job()
            if job is None:
                if self.cfg.exit_when_empty:
                    self._stop_reason = "the queue is empty"
                    return 0
                if not idle_noted:
                    rss = round(current_rss_mb(), 1)
                    self.note("idle", f"the queue is empty: waiting (RSS {rss} MB)", rss_mb=rss)
                    self._state(status="idle", job=None, idle_rss_mb=rss)
                    idle_noted = True
                self.stop.wait(self.cfg.poll_s)
                continue
            idle_noted = False
            try:
                code = self._run_job(job)
            except Exception as e:  # noqa: BLE001 - a bug must not make a restarted daemon retry it forever
                LOG.exception(f"job {job.id}: unexpected error")
                self.note("error", f"job {job.id} failed on an unexpected error (a bug; the traceback is in the "
                          f"log): {type(e).__name__}: {e}", job.id, level=logging.ERROR)
                self.db.set_job(job.id, state="failed", error=f"{type(e).__name__}: {e}", finished=time.time())
                code = None
            _give_memory_back()
            if code is not None:
                return code

    def _run_job(self, job: Job) -> int | None:
        """Train one job; None to go on with the queue, an exit code to stop the daemon."""
        from qes_edge.training.executors.local import StepAbandoned
        from qes_edge.training.session import RecordError, Session, SessionError, SessionOptions, peak_rss_mb
        from qes_edge.training.config import TrainConfig

        o = job.options
        self.note("job", f"job {job.id}: {'resuming' if job.state == 'running' else 'starting'} "
                  f"{Path(job.model).name} task {job.task} to step {job.steps}, ledger {job.ledger}", job.id)
        self.db.set_job(job.id, state="running", started=job.started or time.time(), error=None)
        self._state(status="opening", job=job.id, ledger=job.ledger, target=job.steps)
        self.serving = Path(job.ledger)
        opts = SessionOptions(TrainConfig(**o["cfg"]), model=job.model, ledger=Path(job.ledger),
                              explicit=o.get("explicit", ()), resume=o.get("resume", False),
                              new_run=o.get("new_run", False) and job.run_id is None,
                              threads=self.cfg.threads or o.get("threads", 0), gpu_layers=o.get("gpu_layers", 0))

        def stop_check():
            if self.stop.is_set():
                raise StepAbandoned("stop requested")

        try:
            session = Session.open(opts, say=lambda m: self.note("info", f"job {job.id}: {m}", job.id))
        except SessionError as e:
            self.note("error", f"job {job.id} failed: {e}", job.id, level=logging.ERROR)
            self.db.set_job(job.id, state="failed", error=str(e), finished=time.time())
            return None
        try:
            with session:
                if job.run_id is None or job.run_id != session.run.run_id:
                    self.db.set_job(job.id, run_id=session.run.run_id)
                session.trainer.executor.should_stop = self.stop.is_set
                self._share(session, job)
                n = session.recorded_steps()
                if n:
                    self._state(status=f"replaying {n} steps")
                    session.catch_up(lambda i, total: stop_check())
                    self.note("info", f"job {job.id}: rebuilt the weights from the base model and {n} ledger steps, "
                              f"every weights hash checked", job.id)
                mem = session.record_memory()
                self._state(status="training", run_id=session.run.run_id, step=session.step,
                            inference_rss_mb=mem["inference_rss_mb"], peak_rss_mb=round(peak_rss_mb(), 1))

                def on_step(rec):
                    import numpy as np
                    self.steps_done += 1
                    t = rec.timings
                    self._state(step=session.step, peak_rss_mb=round(peak_rss_mb(), 1), last_step_time=time.time())
                    LOG.info(f"job {job.id}: step {rec.step} reward {float(np.nanmean(rec.rewards)):.4f} "
                             f"changed {t.get('changed')} eval {t.get('eval_s', 0):.2f} s "
                             f"update {t.get('update_s', 0):.2f} s hash {rec.hash[:12]}"
                             + (f"; no signal ({t['no_signal']})" if t.get("no_signal") else ""))
                    from qes_edge.training.no_signal import STREAK, alarm
                    n, cause = session.no_signal_streak()
                    if n == STREAK:
                        self.note("no-signal", f"job {job.id}: {alarm(n, cause)}", job.id, step=rec.step)

                def on_eval(step, m, failure, split="heldout"):
                    what = "held-out" if split == "heldout" else split
                    if failure:
                        self.note("eval", f"job {job.id}: {what} evaluation at step {step} failed: {failure}", job.id)
                    else:
                        self.note("eval", f"job {job.id}: {what} at step {step}: "
                                  + ", ".join(f"{k} {v:.3f}" for k, v in m.items()), job.id, step=step, **m)

                reason = session.train(job.steps, eval_every=job.eval_every, gate=lambda: self.gate(job.id),
                                       on_step=on_step, on_eval=on_eval, on_prompt=stop_check)
                if reason == "done":
                    self.db.set_job(job.id, state="done", finished=time.time())
                    self.note("done", f"job {job.id}: done, {session.step} steps, head {session.head()}", job.id,
                              head=session.head())
                    return None
                if reason.startswith("abandoned"):
                    self._check_restored(session, job, reason.removeprefix("abandoned: "))
                self.note("info", f"job {job.id}: stopped at step {session.step} ({reason}); it resumes there "
                          "at the next start", job.id)
                self._stop_reason = reason if not reason.startswith("abandoned") else "stop requested"
                return 0
        except StepAbandoned:  # during catch-up: nothing was written
            self._stop_reason = "stop requested"
            return 0
        except RecordError as e:
            self.note("error", f"job {job.id}: the ledger could not be written, stopping the daemon: {e} "
                      "(the ledger is intact; free space and start the daemon again to resume)", job.id,
                      level=logging.ERROR)
            self._stop_reason = f"error: {e}"
            return 1
        except SessionError as e:
            self.note("error", f"job {job.id} failed: {e}", job.id, level=logging.ERROR)
            self.db.set_job(job.id, state="failed", error=str(e), finished=time.time())
            return None

    def _share(self, session, job: Job) -> None:
        """The job's --peers or --ray: members evaluated elsewhere too.  A worker that cannot be
        reached now is left out (logged): its members are evaluated here, which records the same
        step (the executors' contract), so an unreachable device never stops a night's training."""
        o = job.options
        if o.get("peers"):
            from qes_edge.sync import LinkError, open_link
            links = []
            for url in o["peers"]:
                try:
                    links.append(open_link(url))
                except LinkError as e:
                    self.note("peer", f"job {job.id}: worker {url} cannot be reached ({e}): its members are "
                              "evaluated here", job.id)
            if links:
                session.share_with_peers(links)
        elif o.get("ray"):
            session.share_with_ray(int(o["ray"]))

    def _check_restored(self, session, job: Job, what: str) -> None:
        """After a stop request: the live weights must be those of the last recorded step."""
        from qes_edge.native.engine import digest_tensors
        want = session.history[-1].weights_sha256 if session.history else None
        got = digest_tensors(session.trainer.tensors)
        if want is None or got == want:
            self.note("info", f"job {job.id}: {what}; the weights are restored"
                      + (f" (hash {got[:12]}… equals step {session.step - 1}'s)" if want else ""), job.id)
        else:  # never expected: say it loudly; the ledger is still right, the next start rebuilds
            self.note("error", f"job {job.id}: {what}, but the weights hash {got[:12]}… differs from the recorded "
                      f"{want[:12]}…; the next start rebuilds them from the ledger", job.id, level=logging.ERROR)


def _give_memory_back() -> None:
    """After a job the model is gone; hand the freed heap back to the system, so that an idle
    daemon holds what an idle Python process holds, not the high-water mark of the last run."""
    import ctypes
    import ctypes.util
    import gc
    gc.collect()
    name = ctypes.util.find_library("c")
    if name and os.uname().sysname == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def start_detached(argv: list[str], home: Path, timeout: float = 20.0) -> int:
    """Start `argv` (a `daemon run` command) in a new session, detached from this terminal; wait
    until it holds the lock.  Returns its pid; DaemonError with its output when it did not start."""
    import subprocess
    paths = daemon_paths(home)
    home.mkdir(parents=True, exist_ok=True)
    with open(paths["out"], "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, HOME_ENV: str(home)})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = paths["out"].read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise DaemonError(f"the daemon exited at once ({proc.returncode}): {tail[0]}")
        if running_pid(paths["lock"]) == proc.pid:
            return proc.pid
        time.sleep(0.1)
    raise DaemonError(f"the daemon (pid {proc.pid}) did not take the lock within {timeout:.0f} s; see {paths['out']}")


def stop_daemon(home: Path, timeout: float = 120.0) -> int | None:
    """SIGTERM the home's daemon and wait until it has released the lock.  The pid, or None when
    none was running."""
    lock = daemon_paths(home)["lock"]
    pid = running_pid(lock)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if running_pid(lock) is None:
            return pid
        time.sleep(0.2)
    raise DaemonError(f"the daemon (pid {pid}) did not stop within {timeout:.0f} s after SIGTERM")
