"""Tasks over the user's JSONL: {"prompt": ..., "answer": ...} (exact) or {"prompt", "pattern"} (regex),
or any reward callable (prompt, completion, example) -> float."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import Example, RewardFailure, Task, checked_reward


def read_jsonl(path: str | Path) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{i}: each line needs a string 'prompt'")
            out.append(Example(row["prompt"], answer=row.get("answer"), meta=row))
    if len(out) < 4:
        raise ValueError(f"{path}: needs at least 4 examples")
    return out


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path, seed: int = 0, heldout_fraction: float = 0.2, max_tokens: int = 32):
        ex = read_jsonl(path)
        order = np.random.default_rng(999).permutation(len(ex))
        k = max(1, int(len(ex) * heldout_fraction))
        self._heldout = [ex[i] for i in order[:k]]
        self._train = [ex[i] for i in order[k:]]
        self.max_tokens = max_tokens
        self.path = str(path)

    def train_examples(self):
        return self._train

    def heldout_examples(self):
        return self._heldout

    def reward_one(self, ex: Example, completion: str) -> float:
        if "pattern" in ex.meta:
            return 1.0 if re.search(ex.meta["pattern"], completion) else 0.0
        return 1.0 if completion.strip() == str(ex.answer).strip() else 0.0

    def rewards(self, model, batch):
        return np.array([self.reward_one(ex, model.generate(ex.prompt, self.max_tokens)) for ex in batch])

    def describe(self):
        return {"name": self.name, "data": self.path}


class CallableRewardTask(JsonlTask):
    name = "callable"

    def __init__(self, fn, path, seed: int = 0, **kw):
        super().__init__(path, seed=seed, **kw)
        self.fn = fn

    def reward_one(self, ex, completion):
        where = f"{getattr(self.fn, '__module__', '?')}:{getattr(self.fn, '__name__', '?')}"
        try:
            value = self.fn(ex.prompt, completion, ex.meta)
        except Exception as e:  # the user's code: any failure is this member's failure
            raise RewardFailure(f"{where} raised {type(e).__name__}: {e}") from None
        return checked_reward(value, where)

    def describe(self):
        return {"name": f"{self.fn.__module__}:{self.fn.__name__}", "data": self.path}
