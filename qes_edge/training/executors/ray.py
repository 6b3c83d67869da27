"""Members evaluated by Ray actors, for users who outgrow their devices (`pip install
'qes-edge[ray]'`; docs/sync-protocol.md §10).

Each actor (:class:`MemberActor`) loads its own copy of the model and keeps it at the run's
weights by applying the ledger rows it is sent to its replica (`Replica.apply`), which checks every
weights hash: before it evaluates step k it holds the weights after step k-1, and every copy
applies the identical update.  Only the rows an actor lacks, the step's member seeds and batch
ids go out, and rewards come back; no model, no weights, no gradients cross.  The work goes out
as one Ray task per actor (a contiguous share of mirrored pairs each) and comes back with
`ray.get`: Ray places and runs the actors, nothing here schedules.  An actor that dies is
replaced (the new one rebuilds from the base and every row) and its share is evaluated on this
process, so a step is never recorded with a reward missing.

    ray.init()                      # or an address: ray.init("ray://head:10001")
    with Session.open(opts) as s:
        s.trainer.executor = RayExecutor.for_session(s, actors=4, threads=2)
        s.train(100)
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from qes_edge.training.executors.local import Evaluation, Gathered, LocalExecutor, StepAbandoned
from qes_edge.training.executors.peers import split_members

INSTALL = "pip install 'qes-edge[ray]'"


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"RayExecutor needs Ray, which is not installed: {INSTALL}") from None
    return ray


class MemberActor:
    """One copy of the model at the run's weights (a Ray actor: `ray.remote(MemberActor)`)."""

    def __init__(self, opener: Callable[[dict], tuple], run_info: dict):
        import json

        from qes_edge.native.engine import TensorGroup, sigma_threshold
        from qes_edge.training.config import TrainConfig
        from qes_edge.training.replica import Replica
        cfg = TrainConfig.from_record(json.loads(run_info["config"]))
        driver, task, threads = opener(run_info)
        self.driver, self.threads = driver, threads
        self.replica = Replica(driver.tensors, cfg, threads)
        self.local = LocalExecutor(driver, task, TensorGroup(driver.tensors, threads), sigma_threshold(cfg.sigma))

    def n_steps(self) -> int:
        return self.replica.steps

    def evaluate(self, rows: list, step: int, members: list[int], seeds: list[int], batch_ids: list[int]):
        """Apply `rows` (the steps after this actor's head, each weights hash checked), then score
        the members: (rewards, failures, timings, this actor's step count)."""
        for rec in rows:
            if rec.step < self.replica.steps:
                continue
            if rec.step != self.replica.steps:
                raise RuntimeError(f"step {rec.step} sent to an actor that holds {self.replica.steps} steps")
            self.replica.apply(rec)
        if self.replica.steps != step:
            raise RuntimeError(f"step {step} asked of an actor that holds {self.replica.steps} steps")
        m = self.local.evaluate_members(members, seeds, [self.local.examples[i] for i in batch_ids])
        return m.rewards, m.failures, {**m.timings, "parts": m.parts}, self.replica.steps


class RayExecutor:
    """A step's members split over `actors` Ray actors (mirrored pairs together).

    `opener(run_info) -> (driver, task, threads)` builds an actor's model and task (it runs in the
    actor: the default, :func:`qes_edge.training.opening.model_opener`, loads `model`, checks it is the
    run's base and loads the task from the run's config).  `local` (a LocalExecutor on this
    process) evaluates the share of an actor that died."""

    def __init__(self, local: LocalExecutor | None, actors: int = 2, *, opener: Callable | None = None,
                 model: str | None = None, threads: int = 1, num_cpus: float | None = None,
                 say: Callable[[str], None] = lambda m: None):
        self.ray = _ray()
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        if opener is None:
            from qes_edge.training.opening import model_opener
            opener = model_opener(model, threads)
        self.local, self.n_actors, self.opener, self.say = local, actors, opener, say
        self.num_cpus = float(threads if num_cpus is None else num_cpus)
        self.actors: list = []
        self.sent: list[int] = []       # rows each actor holds (as far as this side knows)
        self.ledger = self.run_id = self.info = None
        self.replaced = 0

    @classmethod
    def for_session(cls, session, actors: int = 2, **kw) -> "RayExecutor":
        ex = cls(session.trainer.executor, actors, say=session.say, **kw)
        ex.bind(session.ledger, session.run.run_id)
        return ex

    def bind(self, ledger, run_id: str) -> None:
        """Start the actors for the run (Ray must be initialised: `ray.init()`)."""
        if not self.ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call ray.init() (or ray.init(address=...)) first")
        self.ledger, self.run_id = ledger, run_id
        self.info = ledger.export_run(run_id)
        self.actors = [self._new_actor() for _ in range(self.n_actors)]
        self.sent = [0] * self.n_actors

    def _new_actor(self):
        remote = self.ray.remote(num_cpus=self.num_cpus)(MemberActor)
        return remote.remote(self.opener, self.info)

    def _wait(self, futures: list) -> None:
        """Wait for the actors, asking `local.should_stop` twice a second: a stop request abandons
        the step (StepAbandoned, nothing recorded); the actors, whose state this side no longer
        knows, are killed and started afresh if another step comes."""
        stop = getattr(self.local, "should_stop", None)
        pending = list(futures)
        while pending:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if pending and stop is not None and stop():
                self._kill_actors()
                raise StepAbandoned("stop requested while Ray actors evaluated the members")

    def evaluate(self, step: int, seeds: np.ndarray, batch_ids: np.ndarray) -> Evaluation:
        ray = self.ray
        if not self.actors:  # after an abandoned step
            self.actors = [self._new_actor() for _ in range(self.n_actors)]
            self.sent = [0] * self.n_actors
        rows = list(self.ledger.steps(self.run_id, min(self.sent + [step]), step))
        by_step = {r.step: r for r in rows}
        shares = split_members(len(seeds), self.n_actors)
        batch = [int(b) for b in batch_ids]
        futures = []
        for a, (actor, idx) in enumerate(zip(self.actors, shares)):
            mine = [by_step[k] for k in range(self.sent[a], step)]
            futures.append(actor.evaluate.remote(mine, step, [int(i) for i in idx], [int(seeds[i]) for i in idx],
                                                 batch))
        got = Gathered(len(seeds))
        t0 = time.perf_counter()
        self._wait(futures)
        for a, (fut, idx) in enumerate(zip(futures, shares)):
            try:
                r, fails, tt, n = ray.get(fut)
            except (ray.exceptions.RayError, RuntimeError) as e:
                if self.local is None:
                    raise
                self.say(f"Ray actor {a} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                         "its members are evaluated here and the actor is replaced")
                try:
                    ray.kill(self.actors[a])
                except Exception:
                    pass
                self.actors[a], self.sent[a] = self._new_actor(), 0
                self.replaced += 1
                m = self.local.evaluate_members(idx, seeds[idx], [self.local.examples[i] for i in batch_ids],
                                                self.local.stop_check(step, len(idx)))
                r, fails, tt, n = m.rewards, m.failures, {**m.timings, "parts": m.parts}, None
            else:
                self.sent[a] = n
            got.add(idx, r, fails, tt, tt.get("parts"))
        return got.evaluation(ray_wait_s=time.perf_counter() - t0, actors=self.n_actors)

    def _kill_actors(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self.actors = []

    def close(self) -> None:
        self._kill_actors()
        if self.local is not None:
            self.local.close()
