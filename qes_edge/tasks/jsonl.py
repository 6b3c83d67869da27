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


class ChoiceTask(JsonlTask):
    """Multiple choice from JSONL {"prompt", "choices": [...], "answer": index}, scored by the logits
    of each choice's first token after the prompt: one forward pass per example, no generation.
    Reward: p(correct choice) renormalised over the choices."""

    name = "choice"

    def __init__(self, path, seed: int = 0, **kw):
        super().__init__(path, seed=seed, **kw)
        for ex in self._train + self._heldout:
            ch, ans = ex.meta.get("choices"), ex.meta.get("answer")
            if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
                raise ValueError(f"{path}: every line needs 'choices', a list of at least two non-empty strings")
            if not (isinstance(ans, int) and 0 <= ans < len(ch)):
                raise ValueError(f"{path}: 'answer' must be the index of the right choice (got {ans!r})")

    @staticmethod
    def choice_logits(model, ex: Example) -> np.ndarray:
        ids = [model.tokenize(c, add_bos=False)[0] for c in ex.meta["choices"]]
        return model.logits(model.tokenize(ex.prompt)).astype(np.float64)[ids]

    @staticmethod
    def p_correct(logits: np.ndarray, answer: int) -> float:
        p = np.exp(logits - logits.max())
        return float(p[answer] / p.sum())

    def strata(self):
        return [ex.meta["answer"] for ex in self._train]

    def rewards(self, model, batch):
        return np.array([self.p_correct(self.choice_logits(model, ex), ex.meta["answer"]) for ex in batch])

    def evaluate(self, model, examples):
        logits = [self.choice_logits(model, ex) for ex in examples]  # one forward pass each
        p = [self.p_correct(lg, ex.meta["answer"]) for lg, ex in zip(logits, examples)]
        hits = [int(np.argmax(lg)) == ex.meta["answer"] for lg, ex in zip(logits, examples)]
        return {"reward": float(np.mean(p)), "accuracy": float(np.mean(hits))}
