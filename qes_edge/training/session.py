"""A training session: one run opened (or resumed) and trained until a stop condition.

Opening checks everything that can be checked before any work, in this order: the options,
the ledger (a run it holds wins: its recorded config, chain and head verified, its data file
unchanged), the model (our own validation, then its sha256 against the run's), the task, then
llama.cpp loads and every prompt is rendered and tokenized; only then does a new run exist in
the ledger.  Training catches up by replaying the ledger (the weights are rebuilt from base +
ledger and checked against every recorded hash), evaluates held-out examples when due, and runs
steps until the target, a stop request, or a gate (budgets, battery, heat) says stop.

`qes-edge train`, the daemon, the benchmarks and the tests all train through this module.
Problems a user can cause are raised as :class:`SessionError` with a one-line message.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qes_edge.ledger.store import Ledger, LedgerError, Run, StepRecord, check_not_directory
from qes_edge.native import binding as _native
from qes_edge.native.quant import QESError
from qes_edge.training.config import TrainConfig
from qes_edge.training.executors.local import StepAbandoned
from qes_edge.training.trainer import Trainer, TrainingStopped
from qes_edge.training.opening import (SessionError, check_recorded_data, differences, load_task, prepare_driver,
                                       open_driver, trainable_model)

#: the train options that make up a run's identity (its recorded config)
RUN_OPTIONS = ("task", "data", "population", "sigma", "alpha", "beta", "window", "error_feedback", "residual",
               "batch", "balance", "seed", "n_ctx", "raw_prompt", "choice_norm", "coef_scheme", "eval_batch",
               "rewards")


class RecordError(SessionError):
    """The ledger could not be written (a full disk, a read-only file): the step was not recorded,
    the ledger is as it was and the run resumes once the cause is fixed."""


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return peak_rss_mb()


# -- the session ----------------------------------------------------------------------------

@dataclass
class SessionOptions:
    """What `qes-edge train` (or a queued job) asks for."""
    cfg: TrainConfig
    model: str | None = None
    ledger: Path | None = None
    explicit: Sequence[str] = ()   # the RUN_OPTIONS the user gave (the others are defaults)
    resume: bool = False           # continue with the recorded config even where `explicit` differ
    new_run: bool = False          # start a new run beside the ledger's
    threads: int = 0               # 0: every core this process may use
    gpu_layers: int = 0            # layers llama.cpp offloads to the GPU (-1: all)


def say_nothing(msg: str) -> None:
    pass


@dataclass
class Session:
    ledger_path: Path
    ledger: Ledger
    run: Run
    cfg: TrainConfig
    model_path: Path
    driver: object
    task: object
    trainer: Trainer
    threads: int
    say: Callable[[str], None] = say_nothing
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, opts: SessionOptions, say: Callable[[str], None] = say_nothing, driver=None,
             executor=None) -> "Session":
        """Open or resume the run `opts` describes; raises SessionError with nothing written for a
        problem the user can fix.  `driver`: an already loaded ModelDriver of the same model (the
        benchmarks reuse one across runs)."""
        from qes_edge.gguf.model import file_sha256
        from qes_edge.home import default_ledger
        from qes_edge.gguf.models import ModelNotFound, resolve_model
        from qes_edge.threads import resolve_threads

        cfg = opts.cfg
        try:
            cfg.validate()
        except (ValueError, QESError) as e:
            raise SessionError(str(e)) from None
        if opts.resume and opts.new_run:
            raise SessionError("--resume continues the ledger's run and --new-run starts another: give one of them")
        n_threads = resolve_threads(opts.threads)
        try:
            path = resolve_model(opts.model) if driver is None else Path(driver.path)
        except ModelNotFound as e:
            raise SessionError(str(e)) from None
        ledger_path = Path(opts.ledger) if opts.ledger else default_ledger(path, cfg.task, cfg.seed)
        try:
            check_not_directory(ledger_path)
        except LedgerError as e:
            raise SessionError(str(e)) from None
        if ledger_path.exists() and ledger_path.stat().st_size == 0:
            raise SessionError(f"{ledger_path}: is an empty file, not a ledger (remove it to start a run there)")

        lg = run = None
        try:
            # 1. a ledger that already holds a run: its recorded config wins
            if ledger_path.exists():
                lg = Ledger(ledger_path)
                if lg.repaired:
                    say(f"{ledger_path}: the {', '.join(lg.repaired)} table(s) were missing: rebuilt from the "
                        "recorded steps (derived data; the steps verify)")
                run, cfg = cls._existing_run(lg, ledger_path, opts, say)
            # 2. the model and the task, checked before llama.cpp loads
            path = trainable_model(path, cfg.frozen)
            sha = file_sha256(path)
            if run is not None and run.base_sha256 != sha:
                raise SessionError(f"ledger {ledger_path} belongs to base model sha256 {run.base_sha256[:16]}…, "
                                   f"not {path.name} ({sha[:16]}…): refusing to mix them")
            task = load_task(cfg, path)
            if driver is None:
                driver = open_driver(path, cfg.n_ctx, n_threads, cfg.frozen, opts.gpu_layers)
            prepare_driver(driver, task, cfg)
            # 3. only now does a new run exist
            resumed = run is not None
            if run is None:
                lg, run = cls._new_run(lg, ledger_path, cfg, path, sha, opts.model)
            trainer = Trainer(driver, task, lg, run, cfg, threads=n_threads, executor=executor)
        except LedgerError as e:
            if lg is not None:
                lg.close()
            raise SessionError(str(e)) from None
        except BaseException:
            if lg is not None:
                lg.close()
            raise
        return cls(ledger_path, lg, run, cfg, path, driver, task, trainer, n_threads, say, resumed)

    @staticmethod
    def _existing_run(lg: Ledger, ledger_path: Path, opts: SessionOptions, say) -> tuple[Run | None, TrainConfig]:
        cfg = opts.cfg
        runs = lg.runs()
        if runs and opts.new_run:
            say(f"{ledger_path}: starting a new run beside {len(runs)} recorded one(s)")
            return None, cfg
        if not runs:
            return None, cfg
        run = runs[-1]  # the latest
        n_done = lg.verify(run.run_id)
        if n_done == 0:
            # a start that failed before its first step: no training state, start afresh
            lg.delete_run(run.run_id)
            say(f"{ledger_path}: its run {run.run_id[:8]} had no step (a failed start): starting afresh "
                "with these options")
            return None, cfg
        differ = differences(cfg.record(), run.config, opts.explicit)
        if differ and not opts.resume:
            raise SessionError(f"{ledger_path} holds run {run.run_id[:8]} ({n_done} steps), recorded with other "
                               f"options: {'; '.join(differ)}. To continue it, leave those options out (or add "
                               f"--resume to continue with the recorded ones); to start a new run, give another "
                               f"--ledger or add --new-run")
        cfg = TrainConfig.from_record(run.config)
        try:
            cfg.validate()
        except (ValueError, QESError) as e:
            raise SessionError(f"{ledger_path}: the recorded config is not usable: {e}") from None
        check_recorded_data(run.config, ledger_path)
        say(f"resuming run {run.run_id[:8]} from {ledger_path} at step {n_done} (its recorded config is used)")
        if differ:
            say("note: --resume: options that differ from the run's were ignored: " + "; ".join(differ))
        return run, cfg

    @staticmethod
    def _new_run(lg, ledger_path: Path, cfg: TrainConfig, path: Path, sha: str, given: str | None = None):
        created = not ledger_path.exists()
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if lg is None:
                lg = Ledger(ledger_path)
            record = cfg.record()
            # where the base model was and what it was called: replay, export and follow find it there
            # without --base (checked against base_sha256 where they open it)
            record["base_path"] = str(Path(path).resolve())
            record["base_given"] = given
            if cfg.data:  # changed data is refused on resume
                from qes_edge.training.opening import data_sha256
                record["data_sha256"] = data_sha256(cfg.data, cfg.split)
            return lg, lg.create_run(sha, path.name, record, _native.lib.qes_noise_spec_version())
        except LedgerError:
            if created:  # leave nothing behind: the file, its -wal and -shm
                if lg is not None:
                    lg.close()
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(str(ledger_path) + suffix).unlink(missing_ok=True)
            raise

    # -- training -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps done (the next step's number)."""
        return len(self.trainer.history)

    @property
    def history(self) -> list[StepRecord]:
        return self.trainer.history

    def recorded_steps(self) -> int:
        last = self.ledger.last_step(self.run.run_id)
        return 0 if last is None else last.step + 1

    def catch_up(self, on_step: Callable[[int, int], None] | None = None) -> int:
        """Rebuild the working weights from base + ledger, checking every recorded weights hash."""
        try:
            return self.trainer.catch_up(on_step)
        except LedgerError as e:
            raise SessionError(str(e)) from None

    def record_memory(self) -> dict:
        """The process's RSS with the model loaded and checked, before training: this process's
        inference level, recorded beside the run for the report (not part of the chain)."""
        now = current_rss_mb()
        m = {"inference_rss_mb": round(now, 1), "peak_rss_mb": round(max(now, peak_rss_mb()), 1)}
        try:
            self.ledger.record_eval(self.run.run_id, self.step, "memory", m)
        except LedgerError as e:
            raise RecordError(str(e)) from None
        return m

    def evaluated_at(self, step: int, split: str = "heldout") -> bool:
        return any(e["step"] == step and e.get("split", "heldout") == split for e in self.ledger.evals(self.run.run_id))

    def evaluate(self, on_prompt: Callable[[], None] | None = None, split: str = "heldout") -> dict:
        """Score the held-out examples (split "test": a data folder's test.jsonl) on the current
        weights and record them at this step.  Raises RewardFailure when the task cannot score them."""
        examples = self.task.examples_of(split)
        self.driver.on_prompt = on_prompt
        try:
            m = self.task.evaluate(self.driver, examples)
        finally:
            self.driver.on_prompt = None
        try:
            self.ledger.record_eval(self.run.run_id, self.step, split, m)
        except LedgerError as e:
            raise RecordError(str(e)) from None
        return m

    def train_step(self) -> StepRecord:
        """One recorded step (StepAbandoned: nothing recorded; SessionError: the run cannot go on)."""
        try:
            return self.trainer.step(extra_timings=lambda: {"rss_mb": round(peak_rss_mb(), 1)})
        except TrainingStopped as e:
            raise SessionError(str(e)) from None
        except LedgerError as e:
            raise RecordError(str(e)) from None

    def train(self, steps: int, *, eval_every: int = 0, gate: Callable[[], str | None] | None = None,
              on_step: Callable[[StepRecord], None] | None = None,
              on_eval: Callable[[int, dict | None, str | None], None] | None = None,
              on_prompt: Callable[[], None] | None = None) -> str:
        """Train until `steps` steps are recorded; returns why it stopped: "done", or the reason
        `gate` gave (asked before each step; it may block while the run is paused), or
        "abandoned: ..." when a stop request abandoned a step or an evaluation (`on_prompt` may
        raise StepAbandoned).  Held-out evaluation at the start (unless recorded at this step),
        every `eval_every` steps, and at the end; a data folder's test.jsonl once, at the end
        (on_eval(step, metrics, failure, split) says which)."""
        from qes_edge.tasks.base import RewardFailure

        def evaluate(split: str = "heldout") -> str | None:
            try:
                m = self.evaluate(on_prompt, split)
            except RewardFailure as e:
                if on_eval:
                    on_eval(self.step, None, str(e), split)
                return None
            except StepAbandoned as e:
                return f"abandoned: {'held-out' if split == 'heldout' else split} evaluation at step {self.step}: {e}"
            if on_eval:
                on_eval(self.step, m, None, split)
            return None

        if not self.evaluated_at(self.step):
            if (stopped := evaluate()):
                return stopped
        while self.step < steps:
            if gate is not None:
                reason = gate()
                if reason:
                    return reason
            try:
                rec = self.train_step()
            except StepAbandoned as e:
                return f"abandoned: {e}"
            if on_step:
                on_step(rec)
            if (eval_every and self.step % eval_every == 0) or self.step == steps:
                if (stopped := evaluate()):
                    return stopped
        if self.task.test_examples() and not self.evaluated_at(self.step, "test"):
            if (stopped := evaluate("test")):
                return stopped
        return "done"

    def head(self) -> str:
        return self.ledger.head_hash(self.run.run_id)

    def no_signal_streak(self) -> tuple[int, str | None]:
        """The no-signal steps at the end of the run so far, and the last one's cause (no_signal.py)."""
        from qes_edge.training.no_signal import streak
        return streak(r.timings for r in self.history)

    # -- who evaluates the members (the executor seam) ---------------------------------------
    def share_with_peers(self, links) -> None:
        """Split each step's members between this process and workers (`qes-edge worker`) on
        `links`; a worker that cannot hold the run is left out (said), one that drops out has
        its members evaluated here."""
        from qes_edge.training.executors.peers import PeerExecutor
        self.trainer.executor = PeerExecutor.for_session(self, links)

    def share_with_ray(self, actors: int) -> None:
        """Evaluate each step's members on `actors` Ray actors, each with its own copy of this
        model at this --threads (the cluster named by RAY_ADDRESS, else a local Ray started
        here with a CPU for each actor's threads)."""
        import os

        from qes_edge.training.executors.ray import RayExecutor, _ray
        ray = _ray()
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, actors * self.threads), include_dashboard=False,
                         log_to_driver=False)
        self.trainer.executor = RayExecutor.for_session(self, actors, model=str(self.model_path),
                                                        threads=self.threads)

    def close(self) -> None:
        try:
            self.trainer.executor.close()
        finally:
            self.ledger.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
