"""Tasks over the user's JSONL: {"prompt": ..., "answer": ...} (exact) or {"prompt", "pattern"} (regex),
or any reward callable (prompt, completion, example) -> float."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import Example, RewardFailure, Task, checked_reward


MAX_DATA_BYTES = 1 << 30  # a JSONL of prompts larger than 1 GiB is a mistake, not a task


def read_jsonl(path: str | Path) -> list[Example]:
    """The examples of a JSONL file; ValueError names the file (and line) on any problem."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p}: is not a file (a JSONL file of prompts is expected)")
    try:
        if p.stat().st_size > MAX_DATA_BYTES:
            raise ValueError(f"{p}: {p.stat().st_size:,} bytes is larger than the {MAX_DATA_BYTES:,} a data file may have")
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e.strerror})") from None
    if b"\0" in raw:
        raise ValueError(f"{p}: is a binary file, not JSONL text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: is not UTF-8 text (byte {e.start}), not a JSONL file") from None
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{p}:{i}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{p}:{i}: each line needs a string 'prompt'")
        if "pattern" in row:
            if not isinstance(row["pattern"], str):
                raise ValueError(f"{p}:{i}: 'pattern' must be a string (a regular expression)")
            try:
                re.compile(row["pattern"])
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"{p}:{i}: 'pattern' is not a valid regular expression ({e})") from None
        out.append(Example(row["prompt"], answer=row.get("answer"), meta=row))
    if len(out) < 4:
        raise ValueError(f"{p}: needs at least 4 examples, has {len(out)}")
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
