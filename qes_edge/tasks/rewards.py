"""Reward functions as users write them (TRL's form), one or several with weights.

A reward is `module:function`, found as `python -m` finds modules (the current folder first).  It
is called in one of two ways:

- per example: `fn(prompt, completion, example) -> float`;
- per batch, as TRL's reward functions are: `fn(completions, prompts, examples) -> list[float]`,
  once per member's batch.  Detected from the signature (a first parameter named `completions`)
  or marked with the `@batch_reward` decorator (`from qes_edge import
  batch_reward`).

`--reward a:f --reward b:g=0.5` sums the rewards with their weights (1 where none is given);
each one's mean over the batch is kept per member (`reward_parts` in the step's record, `log`,
`--json`).  A reward that raises, returns the wrong number of values or a value that is not a
finite number fails its member, as one reward does."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from qes_edge import batch_reward  # noqa: F401 (the decorator users import: from qes_edge import batch_reward)
from qes_edge.tasks.base import RewardFailure, checked_reward, load_callable


def is_batch(fn: Callable) -> bool:
    """A batch reward: marked with @batch_reward, or its first parameter is named `completions`."""
    if getattr(fn, "qes_batch_reward", False):
        return True
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "completions"


@dataclass(frozen=True)
class RewardFn:
    spec: str          # module:function, as given
    weight: float
    fn: Callable
    batch: bool

    @property
    def name(self) -> str:
        return self.spec

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metas: Sequence[dict]) -> np.ndarray:
        """One finite reward per completion, or RewardFailure naming this reward."""
        where = self.spec
        try:
            if self.batch:
                values = list(self.fn(list(completions), list(prompts), list(metas)))
            else:
                values = [self.fn(p, c, m) for p, c, m in zip(prompts, completions, metas)]
        except RewardFailure:
            raise
        except Exception as e:  # the user's code: any failure is this member's failure
            raise RewardFailure(f"{where} raised {type(e).__name__}: {e}") from None
        if len(values) != len(completions):
            raise RewardFailure(f"{where} returned {len(values)} rewards for a batch of {len(completions)} completions")
        return np.array([checked_reward(v, where) for v in values], np.float64)


def parse_reward(text: str) -> tuple[str, float]:
    """'module:function[=weight]' -> (spec, weight); ValueError for a malformed one."""
    spec, _, w = str(text).partition("=")
    spec = spec.strip()
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"--reward {text!r}: expected module:function or module:function=weight")
    try:
        weight = float(w) if w.strip() else 1.0
    except ValueError:
        raise ValueError(f"--reward {text!r}: the weight {w!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"--reward {text!r}: the weight must be finite")
    return spec, weight


def load_rewards(items: Sequence) -> list[RewardFn]:
    """[(spec, weight)] or ['spec[=weight]'] -> loaded RewardFns (ValueError: a missing module,
    a duplicate, a non-callable, an old-style `batched = True` function)."""
    out, seen = [], set()
    for it in items:
        spec, weight = parse_reward(it) if isinstance(it, str) else (str(it[0]), float(it[1]))
        if spec in seen:
            raise ValueError(f"--reward {spec} is given twice")
        seen.add(spec)
        fn = load_callable(spec)
        batch = is_batch(fn)
        if getattr(fn, "batched", False) and not batch:
            raise ValueError(f"{spec}: `batched = True` (prompts, completions, examples) is replaced by TRL's order: "
                             "write fn(completions, prompts, examples), or mark it with @qes_edge.batch_reward")
        out.append(RewardFn(spec, weight, fn, batch))
    return out


def score(rewards: Sequence[RewardFn], prompts, completions, metas) -> tuple[np.ndarray, dict[str, float]]:
    """(weighted sum per completion, each reward's mean over the batch)."""
    total = np.zeros(len(completions), np.float64)
    parts = {}
    for r in rewards:
        v = r(prompts, completions, metas)
        total += r.weight * v
        parts[r.name] = float(v.mean()) if v.size else 0.0
    return total, parts
