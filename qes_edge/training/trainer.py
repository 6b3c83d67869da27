"""The QES training loop over a ModelDriver, recording every step in the ledger.

One step: draw the step's prompts and member seeds from (run seed, step); the executor
(executor.py) scores each member on them; turn rewards into coefficients,
quantize them once; apply the error-feedback update (the last K ledger steps replayed into the
residual, or the stored residual); hash the weights; append the row.  The update is a pure
function of (codes, ledger rows), shared with `replay` through `apply_recorded_step`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from qes_edge import __version__, faults

from qes_edge.native import binding as _native
from qes_edge.training import derive as derive_v2
from qes_edge.training import no_signal
from qes_edge.training.coefficients import DEFAULT_SCHEME, MEAN_ABS_BOUND, SCHEMES, coefficients
from qes_edge.native.engine import CodeTensor, Step, TensorGroup, digest_tensors, mirrored, sigma_threshold
from qes_edge.training.executors.local import Executor, LocalExecutor
from qes_edge.native.fixed_point import DEFAULT_CLAMP_Q16, beta_to_q14, coefs_to_q16
from qes_edge.ledger.store import Ledger, LedgerError, Run, StepRecord
from qes_edge.tasks.base import CHOICE_NORMS, Task


class TrainingStopped(RuntimeError):
    pass


MAX_POPULATION = 4096
MAX_WINDOW = 1000
MIN_CTX = 64        # the shortest built-in prompt with its chat template is about 40 tokens
MAX_CTX = 1 << 20


@dataclass
class TrainConfig:
    task: str = "sentiment"
    data: str | None = None
    population: int = 16
    sigma: float = 0.01
    alpha: float = 0.001
    beta: float = 0.9
    window: int = 50
    error_feedback: bool = True
    residual: str = "replay"          # "replay" (seed replay) or "stored" (int32 per code)
    anti_windup: bool = True
    coef_scheme: str = DEFAULT_SCHEME   # coefficients.py: "pairs" (new runs), "pairs-rank", "zscore", "rank"
    coef_clip: float = 3.0
    batch: int = 24
    balance: bool = True              # class-balanced batches when the task has classes
    seed: int = 0
    n_ctx: int = 512
    frozen: list = field(default_factory=lambda: ["token_embd.weight", "output.weight"])
    derive: int = 2                   # member seeds and batches: 2 = derive.py (spec), 1 = NumPy (old ledgers)
    raw_prompt: bool = False          # prompts as given, without the model's chat template
    choice_norm: str = "mean"         # choice task: "mean" or "sum" log-probability per choice ("first": old runs)

    def validate(self) -> None:
        """Every check that can be made before any work (model load, evaluation, forward passes),
        including the bound the C library enforces on a step's coefficients."""
        if not isinstance(self.raw_prompt, bool):
            raise ValueError(f"raw_prompt must be true or false, got {self.raw_prompt!r}")
        if self.choice_norm not in CHOICE_NORMS:
            raise ValueError(f"choice_norm must be 'mean' or 'sum' (or 'first', the first token only, as runs "
                             f"before whole-answer scoring), got {self.choice_norm!r}")
        if self.population < 2 or self.population % 2:
            raise ValueError(f"population must be an even number >= 2 (mirrored pairs), got {self.population}")
        if self.population > MAX_POPULATION:
            raise ValueError(f"population {self.population} is above the supported {MAX_POPULATION}")
        if self.residual not in ("replay", "stored"):
            raise ValueError(f"residual must be 'replay' or 'stored', got {self.residual!r}")
        if not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be in [0, {MAX_WINDOW}], got {self.window}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not MIN_CTX <= self.n_ctx <= MAX_CTX:
            raise ValueError(f"n_ctx must be in [{MIN_CTX}, {MAX_CTX}] tokens, got {self.n_ctx}")
        if self.coef_scheme not in SCHEMES:
            raise ValueError(f"coefficient scheme must be one of {', '.join(SCHEMES)}, got {self.coef_scheme!r}")
        if not (math.isfinite(self.coef_clip) and self.coef_clip > 0):
            raise ValueError(f"coefficient clip must be finite and > 0, got {self.coef_clip!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha!r}")
        beta_to_q14(self.beta)  # finite, in [0, 1]
        sigma_threshold(self.sigma)
        # the largest sum of |c_i| a step can have: z-scores (of members or of pair differences)
        # have sum(z^2) = n, so sum|z| <= n (clipping only lowers it); pair weights are within
        # +-1, centered ranks within +-0.5.  Each q_i rounds by <= 1/2.
        sum_c = self.population * MEAN_ABS_BOUND[self.coef_scheme]
        total = math.ceil(sum_c * (self.alpha / self.sigma) * 65536 + self.population / 2)
        coefs_to_q16([min(self.coef_clip, sum_c)], self.alpha, self.sigma)  # one coefficient's own bound
        if total > 2**30:
            raise ValueError(f"alpha {self.alpha} / sigma {self.sigma} is too large for population {self.population}: "
                             f"a step's coefficients could sum to {total:,} in Q16, above the engine's bound of 2^30 "
                             f"({2**30:,}); lower alpha or the population, or raise sigma")

    def record(self) -> dict:
        """Everything that decides the bits, as stored in the ledger."""
        d = asdict(self)
        d.update(threshold=sigma_threshold(self.sigma), clamp_q16=DEFAULT_CLAMP_Q16,
                 noise_spec=_native.lib.qes_noise_spec_version(), engine=__version__)
        return d

    @classmethod
    def from_record(cls, d: dict) -> "TrainConfig":
        # ledgers written before balanced batches drew them at random, and before derive 2 with NumPy;
        # before chat templates every prompt but sentiment's and countdown's went in raw (those two
        # wrote ChatML by hand: the template renders sentiment's byte for byte, countdown's with the
        # model's default system turn), and choices were scored by their first token
        old_raw = d.get("task") not in ("sentiment", "countdown")
        old_norm = "first" if d.get("task") == "choice" else "mean"
        d = {"balance": False, "derive": 1, "raw_prompt": old_raw, "choice_norm": old_norm, "coef_scheme": "zscore",
             **d}  # and member z-scores, before pair differences
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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


class UpdateState:
    """What the update needs besides the codes: the stored residuals (stored mode only)."""

    def __init__(self, cfg: TrainConfig, tensors: Sequence[CodeTensor]):
        self.cfg = cfg
        self.residuals = ([np.zeros(t.n_elements, np.int32) for t in tensors]
                          if cfg.residual == "stored" and cfg.error_feedback else None)

    def window(self, history: Sequence[StepRecord], current: StepRecord) -> list[Step]:
        steps = [current]
        if self.cfg.error_feedback and self.residuals is None and self.cfg.window > 0:
            steps = list(history[-self.cfg.window:]) + steps
        return [Step(r.seeds, r.coefs_q16, r.threshold) for r in steps]

    def apply(self, tensors, history, current, threads=0) -> int:
        steps = self.window(history, current)
        beta = self.cfg.beta if self.cfg.error_feedback else 0.0
        changed = 0
        for i, t in enumerate(tensors):
            res = self.residuals[i] if self.residuals is not None else None
            changed += t.update(steps, res, beta=beta, anti_windup=self.cfg.anti_windup, threads=threads).changed
            if i == len(tensors) // 2:
                faults.point("update")  # half the tensors updated
        return changed


def apply_recorded_step(tensors, state: UpdateState, history: list[StepRecord], rec: StepRecord,
                        threads: int = 0) -> None:
    """Replay one ledger row onto the codes and check the recorded weights hash."""
    state.apply(tensors, history, rec, threads)
    got = digest_tensors(tensors)
    if got != rec.weights_sha256:
        raise LedgerError(f"step {rec.step}: the rebuilt weights hash {got[:16]}… differs from the recorded "
                          f"{rec.weights_sha256[:16]}… (different base model, engine or a corrupted ledger)")


class Trainer:
    """The update side of a step: draw the step's prompts and member seeds, have the executor score
    the members, turn rewards into quantized coefficients, update the codes, record the row."""

    def __init__(self, driver, task: Task, ledger: Ledger, run: Run, cfg: TrainConfig, threads: int = 0,
                 executor: Executor | None = None):
        self.driver, self.task, self.ledger, self.run, self.cfg = driver, task, ledger, run, cfg
        self.threads = threads
        self.tensors = driver.tensors
        self.state = UpdateState(cfg, self.tensors)
        self.history: list[StepRecord] = []
        self.n_examples = len(task.train_examples())
        self.strata = task.strata() if cfg.balance else None
        self.p32 = sigma_threshold(cfg.sigma)
        if executor is None:  # perturb/restore as one call over every tensor, all cores
            executor = LocalExecutor(driver, task, TensorGroup(self.tensors, threads), self.p32)
        self.executor = executor

    def catch_up(self, on_step: Callable[[int, int], None] | None = None) -> int:
        """Bring the live weights to the ledger's last step (resume): replay every recorded row."""
        records = list(self.ledger.steps(self.run.run_id))
        for rec in records:
            apply_recorded_step(self.tensors, self.state, self.history, rec, self.threads)
            self.history.append(rec)
            if on_step:
                on_step(rec.step + 1, len(records))
        return len(records)

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's (member seeds, batch ids): a pure function of (run seed, step)."""
        cfg = self.cfg
        ids = batch_indices(cfg.seed, step, self.n_examples, cfg.batch, self.strata, cfg.derive)
        return member_seeds(cfg.seed, step, cfg.population, cfg.derive), np.asarray(ids)

    def step(self, extra_timings: Callable[[], dict] | None = None) -> StepRecord:
        """One step, recorded.  Raises StepAbandoned (from the executor) with nothing recorded and the
        weights untouched, or TrainingStopped when more than half the members failed."""
        cfg, step = self.cfg, len(self.history)
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
        changed = self.state.apply(self.tensors, self.history, rec, self.threads)
        t["update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rec.weights_sha256 = digest_tensors(self.tensors)
        t["digest_s"] = time.perf_counter() - t0
        t["changed"] = changed
        cause = no_signal.diagnose(rewards, rec.coefs_q16, len(ids))
        if cause:
            t[no_signal.KEY] = cause
        if extra_timings is not None:
            t.update(extra_timings())
        rec.timings = {k: round(v, 6) if isinstance(v, float) else v for k, v in t.items()}
        self.ledger.append_step(self.run.run_id, rec)
        self.history.append(rec)
        return rec
