"""The QES training loop over a ModelDriver, recording every step in the ledger.

One step: draw the step's prompts and member seeds from (run seed, step); the executor
(executors/local.py) scores each member on them; turn rewards into coefficients,
quantize them once; apply the error-feedback update (the last K ledger steps replayed into the
residual, or the stored residual); hash the weights; append the row.  The update is a pure
function of (codes, ledger rows): the trainer's codes are a replica (replica.py) like replay's.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from qes_edge.ledger.store import Ledger, Run, StepRecord
from qes_edge.native.engine import TensorGroup, digest_tensors, mirrored, sigma_threshold
from qes_edge.native.fixed_point import coefs_to_q16
from qes_edge.tasks.base import Task
from qes_edge.training import derive as derive_v2
from qes_edge.training import no_signal
from qes_edge.training.coefficients import coefficients
from qes_edge.training.config import TrainConfig
from qes_edge.training.executors.local import Executor, LocalExecutor
from qes_edge.training.replica import Replica


class TrainingStopped(RuntimeError):
    pass


def member_seeds(run_seed: int, step: int, population: int, derive: int = 2) -> np.ndarray:
    """The step's mirrored member seeds, a pure function of (run seed, step)."""
    if derive == 2:
        return derive_v2.member_seeds(run_seed, step, population)
    _check_derive(derive)
    rng = np.random.default_rng([run_seed & 0xFFFFFFFF, step, 1])
    return mirrored(rng.integers(1, 2**31 - 1, population // 2))


def batch_indices(run_seed: int, step: int, n_examples: int, batch: int, strata=None, derive: int = 2) -> np.ndarray:
    """The step's training examples, a pure function of (run seed, step).  With `strata` (a class
    label per example) every class gets an equal share (the remainder to classes drawn at random,
    a class smaller than its share gives all it has), so that a class prior the model has is not
    what the first steps learn to flip."""
    if derive == 2:
        return derive_v2.batch_indices(run_seed, step, n_examples, batch, strata)
    _check_derive(derive)
    rng = np.random.default_rng([run_seed & 0xFFFFFFFF, step, 2])
    if strata is None:
        return rng.choice(n_examples, size=min(batch, n_examples), replace=False)
    if len(strata) != n_examples:
        raise ValueError(f"{len(strata)} class labels for {n_examples} examples")
    labels = sorted(set(strata), key=lambda x: (type(x).__name__, str(x)))
    members = {c: np.flatnonzero([s == c for s in strata]) for c in labels}
    share = np.full(len(labels), batch // len(labels))
    share[rng.choice(len(labels), size=batch % len(labels), replace=False)] += 1
    picked = [rng.choice(members[c], size=min(int(k), len(members[c])), replace=False)
              for c, k in zip(labels, share)]
    return rng.permutation(np.concatenate(picked))


def _check_derive(derive: int) -> None:
    if derive != 1:
        raise ValueError(f"unknown derivation {derive!r} in the run's config (this qes-edge knows 1 and 2)")


class Trainer:
    """The update side of a step: draw the step's prompts and member seeds, have the executor score
    the members, turn rewards into quantized coefficients, update the codes, record the row."""

    def __init__(self, driver, task: Task, ledger: Ledger, run: Run, cfg: TrainConfig, threads: int = 0,
                 executor: Executor | None = None):
        self.driver, self.task, self.ledger, self.run, self.cfg = driver, task, ledger, run, cfg
        self.threads = threads
        self.tensors = driver.tensors
        self.replica = Replica(self.tensors, cfg, threads)
        self.n_examples = len(task.train_examples())
        self.strata = task.strata() if cfg.balance else None
        self.p32 = sigma_threshold(cfg.sigma)
        if executor is None:  # perturb/restore as one call over every tensor, all cores
            executor = LocalExecutor(driver, task, TensorGroup(self.tensors, threads), self.p32)
        self.executor = executor

    def catch_up(self, on_step: Callable[[int, int], None] | None = None) -> int:
        """Bring the live weights to the ledger's last step (resume): replay every recorded row."""
        return self.replica.catch_up(self.ledger.steps(self.run.run_id), on_step)

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's (member seeds, batch ids): a pure function of (run seed, step)."""
        cfg = self.cfg
        ids = batch_indices(cfg.seed, step, self.n_examples, cfg.batch, self.strata, cfg.derive)
        return member_seeds(cfg.seed, step, cfg.population, cfg.derive), np.asarray(ids)

    def step(self, extra_timings: Callable[[], dict] | None = None) -> StepRecord:
        """One step, recorded.  Raises StepAbandoned (from the executor) with nothing recorded and the
        weights untouched, or TrainingStopped when more than half the members failed."""
        cfg, step = self.cfg, self.replica.steps
        seeds, ids = self.draw(step)
        ev = self.executor.evaluate(step, seeds, ids)
        rewards, failures = np.asarray(ev.rewards, np.float64), ev.failures
        if len(rewards) != len(seeds):
            raise TrainingStopped(f"step {step}: the executor returned {len(rewards)} rewards for {len(seeds)} members")
        if len(failures) > len(seeds) // 2:
            raise TrainingStopped(f"step {step}: {len(failures)} of {len(seeds)} members failed their reward; "
                                  f"first: {failures[0]}")
        c = coefficients(rewards, cfg.coef_scheme, cfg.coef_clip)
        rec = StepRecord(step=step, threshold=self.p32, seeds=seeds, coefs_q16=coefs_to_q16(c, cfg.alpha, cfg.sigma),
                         rewards=rewards, weights_sha256="", failures=len(failures))
        t = dict(ev.timings)
        t0 = time.perf_counter()
        changed = self.replica.update(rec)
        t["update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec.weights_sha256 = digest_tensors(self.tensors)
        t["digest_s"] = time.perf_counter() - t0
        t["changed"] = changed
        cause = no_signal.diagnose(rewards, rec.coefs_q16, len(ids))
        if cause:
            t[no_signal.KEY] = cause
        parts = getattr(ev, "parts", None)
        if parts:  # several --reward: each one's batch mean per member (None: failed, or scored elsewhere)
            names = list(dict.fromkeys(k for p in parts if p for k in p))
            t["reward_parts"] = {n: [None if not p or n not in p else round(float(p[n]), 6) for p in parts]
                                 for n in names}
        if extra_timings is not None:
            t.update(extra_timings())
        rec.timings = {k: round(v, 6) if isinstance(v, float) else v for k, v in t.items()}
        self.ledger.append_step(self.run.run_id, rec)
        self.replica.append(rec)
        return rec

    @property
    def history(self) -> list[StepRecord]:
        return self.replica.history
