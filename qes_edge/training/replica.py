"""A replica of a run's weights: the codes as the ledger makes them, the update's state and the
steps applied so far.  Replay, follow, a peer worker, a Ray actor and the trainer each hold one;
a recorded row reaches the codes only through `Replica.apply`, which checks the row's weights
hash, and a new row only through `Replica.update` then `Replica.append`.  The update is a pure
function of (codes, ledger rows): every replica of a run holds the same bits at the same step."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from qes_edge import faults
from qes_edge.ledger.store import LedgerError, StepRecord
from qes_edge.native.engine import CodeTensor, Step, digest_tensors
from qes_edge.training.config import TrainConfig


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


class Replica:
    """tensors: the live codes (a driver's, or a model file's); cfg: the run's config."""

    def __init__(self, tensors: Sequence[CodeTensor], cfg: TrainConfig, threads: int = 0):
        self.tensors, self.cfg, self.threads = tensors, cfg, threads
        self.state = UpdateState(cfg, tensors)
        self.history: list[StepRecord] = []

    @property
    def steps(self) -> int:
        """Steps applied: the step the next row must have."""
        return len(self.history)

    def update(self, rec: StepRecord) -> int:
        """The update of rec (a new row) on the codes, with the error-feedback window of the steps
        applied so far; the number of codes changed.  rec is not appended: see append."""
        return self.state.apply(self.tensors, self.history, rec, self.threads)

    def append(self, rec: StepRecord) -> None:
        self.history.append(rec)

    def apply(self, rec: StepRecord) -> int:
        """Replay one recorded row onto the codes, check its recorded weights hash (LedgerError on a
        mismatch: a different base model, engine or a corrupted ledger) and append it."""
        changed = self.update(rec)
        got = digest_tensors(self.tensors)
        if got != rec.weights_sha256:
            raise LedgerError(f"step {rec.step}: the rebuilt weights hash {got[:16]}… differs from the recorded "
                              f"{rec.weights_sha256[:16]}… (different base model, engine or a corrupted ledger)")
        self.append(rec)
        return changed

    def catch_up(self, records: Iterable[StepRecord], on_step: Callable[[int, int], None] | None = None) -> int:
        """apply every row of records (a run's steps from the first); on_step(done, total)."""
        records = list(records)
        for rec in records:
            self.apply(rec)
            if on_step:
                on_step(rec.step + 1, len(records))
        return len(records)
