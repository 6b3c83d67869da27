"""Where a step's population members are evaluated: the seam between the training loop and the
devices that score perturbed models.

A step asks an executor for one thing: given (step, member seeds, batch ids), the reward of each
member.  Everything that decides the update (the seeds, the batch, the coefficients, the
codes) stays with the trainer, so an executor that runs members on this process, on a peer
device or on a Ray cluster plugs in here without any change to the trainer, and every device
applies the identical update from the same (seeds, rewards).

An executor may be asked to stop (a daemon's SIGTERM): it then raises :class:`StepAbandoned`
between members with the weights restored; nothing of the step is recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from qes_edge import faults
from qes_edge.ledger.runlog import PHASES
from qes_edge.tasks.base import RewardFailure


class StepAbandoned(Exception):
    """The step was stopped before its members were all evaluated: the weights are the step's
    starting weights, nothing was recorded, and the step can be run again from scratch."""


#: the timings a member's evaluation adds up (a step's timings hold them summed over its members)
MEMBER_PHASES = PHASES[:3]  # perturb_s, eval_s, restore_s


@dataclass
class Members:
    """Some members of a step, scored: reward per member (NaN where it failed), the failures by
    member index ("member i (seed s): why"), and MEMBER_PHASES summed."""
    rewards: list[float]
    failures: dict[int, str]
    timings: dict[str, float]
    parts: list | None = None  # per member: each reward's mean over the batch (several --reward), or None


@dataclass
class Evaluation:
    """What an executor returns for one step."""
    rewards: np.ndarray                                   # float64 per member, NaN where it failed
    failures: list[str] = field(default_factory=list)    # "member i (seed s): why", one per NaN
    timings: dict[str, float] = field(default_factory=dict)  # perturb_s, eval_s, restore_s (summed)
    parts: list | None = None  # per member: {reward: its batch mean} (several --reward), None where not known


class Gathered:
    """A step's members scored in shares, in several places (this process, peers, Ray actors),
    put back in member order: the step's Evaluation once every share is in."""

    def __init__(self, n: int):
        self.rewards = np.full(n, np.nan)
        self.parts: list = [None] * n
        self.failures: dict[int, str] = {}
        self.timings = dict.fromkeys(MEMBER_PHASES, 0.0)

    def add(self, idx, rewards, failures: dict[int, str], timings: dict, parts: list | None = None) -> None:
        """The share of members idx: their rewards (and parts) in idx's order, their failures by
        member index, their MEMBER_PHASES summed (other timings are not added up)."""
        self.rewards[idx] = rewards
        for i, p in zip(idx, parts or ()):
            self.parts[int(i)] = p
        self.failures.update(failures)
        for k in MEMBER_PHASES:
            self.timings[k] += timings.get(k, 0.0)

    def add_members(self, idx, m: Members) -> None:
        self.add(idx, m.rewards, m.failures, m.timings, m.parts)

    def evaluation(self, **timings) -> Evaluation:
        """The step's Evaluation, with the executor's own timings (waits, counts) beside the members'."""
        return Evaluation(self.rewards, [self.failures[k] for k in sorted(self.failures)], {**self.timings, **timings},
                          self.parts if any(p is not None for p in self.parts) else None)


class Executor(Protocol):
    def evaluate(self, step: int, seeds: np.ndarray, batch_ids: np.ndarray) -> Evaluation:
        """The reward of each member seed on the training examples `batch_ids` (indices into the
        task's training examples).  The live weights must be the step's starting weights on
        return."""

    def close(self) -> None:
        ...


class LocalExecutor:
    """Members evaluated one after another on this process's model: perturb every trainable
    tensor with the member's seed, score the batch, restore."""

    def __init__(self, driver, task, group, p32: int, should_stop: Callable[[], bool] | None = None):
        self.driver, self.task, self.group, self.p32 = driver, task, group, p32
        self.examples = list(task.train_examples())
        self.should_stop = should_stop

    def evaluate_member(self, seed: int, batch: Sequence) -> tuple[float, str | None, float, float, float]:
        """(reward, failure or None, perturb s, eval s, restore s) of one member."""
        t0 = time.perf_counter()
        pert = self.group.perturb(int(seed), self.p32)
        t1 = time.perf_counter()
        failure = None
        try:
            faults.point("member")
            reward = float(np.mean(self.task.rewards(self.driver, batch)))
        except RewardFailure as e:
            reward, failure = float("nan"), str(e)
        except BaseException:  # anything else stops the run, but never with the weights perturbed
            pert.restore()
            raise
        t2 = time.perf_counter()
        pert.restore()
        return reward, failure, t1 - t0, t2 - t1, time.perf_counter() - t2

    def evaluate_members(self, members: Sequence[int], seeds: Sequence[int], batch: Sequence,
                         stop: Callable[[int], None] | None = None) -> Members:
        """The member loop every executor runs where the model is (this process, a peer worker, a
        Ray actor): members[k] with seeds[k], one after another, on batch (examples).  stop(k), if
        given, is called before the k-th and may raise StepAbandoned."""
        rewards, failures, parts = [], {}, []
        t = dict.fromkeys(MEMBER_PHASES, 0.0)
        for k, (i, s) in enumerate(zip(members, seeds)):
            if stop is not None:
                stop(k)
            r, fail, *phases = self.evaluate_member(int(s), batch)
            rewards.append(r)
            got = getattr(self.task, "last_parts", None)
            parts.append(None if fail or got is None else dict(got))
            for name, dt in zip(MEMBER_PHASES, phases):
                t[name] += dt
            if fail:
                failures[int(i)] = f"member {i} (seed {s}): {fail}"
        return Members(rewards, failures, t, parts if any(p is not None for p in parts) else None)

    def stop_check(self, step: int, total: int) -> Callable[[int], None] | None:
        """For evaluate_members: StepAbandoned before the k-th of total members once should_stop()."""
        if self.should_stop is None:
            return None

        def stop(k: int) -> None:
            if self.should_stop():
                raise StepAbandoned(f"step {step} abandoned after {k} of {total} members")
        return stop

    def evaluate(self, step: int, seeds: np.ndarray, batch_ids: np.ndarray) -> Evaluation:
        batch = [self.examples[i] for i in batch_ids]
        m = self.evaluate_members(range(len(seeds)), seeds, batch, self.stop_check(step, len(seeds)))
        return Evaluation(np.asarray(m.rewards, np.float64), list(m.failures.values()), m.timings, m.parts)

    def close(self) -> None:
        pass
