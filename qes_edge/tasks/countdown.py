"""Countdown as in the paper: reach a target with the given numbers and + - * /.

Reward (format + answer): 0.1 for an <answer>...</answer> that parses as arithmetic, 1.0 when it
uses each given number exactly once and equals the target.  Generated, so it needs generation:
slower than the logit tasks on a CPU."""

from __future__ import annotations

import re

import numpy as np

from .base import Example, Task
from .safe_arith import UnsafeExpression, evaluate

PROMPT = ("<|im_start|>user\nUsing the numbers {nums}, create an equation that equals {target}. "
          "You can use + - * / and each number once. Show the equation in <answer> </answer> tags."
          "<|im_end|>\n<|im_start|>assistant\n")
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def make_problem(rng: np.random.Generator, n_numbers: int = 3) -> tuple[list[int], int]:
    """Numbers 1..99 and a target reachable with them (built from a random expression)."""
    while True:
        nums = [int(x) for x in rng.integers(1, 100, n_numbers)]
        value = nums[0]
        for x in nums[1:]:
            op = rng.integers(0, 3)
            value = value + x if op == 0 else (value - x if op == 1 else value * x)
        if 1 <= value <= 999:
            return [int(v) for v in rng.permutation(nums)], int(value)


def score(completion: str, nums: list[int], target: int) -> float:
    m = ANSWER.search(completion)
    if not m:
        return 0.0
    expr = m.group(1).split("=")[0]
    try:
        value, used = evaluate(expr)
    except UnsafeExpression:
        return 0.0
    if sorted(used) == sorted(nums) and value == target:
        return 1.0
    return 0.1


class CountdownTask(Task):
    name = "countdown"

    def __init__(self, seed: int = 0, n_train: int = 2000, n_heldout: int = 100, max_tokens: int = 64):
        rng = np.random.default_rng(777)  # fixed problems, whatever the run seed
        probs = [make_problem(rng) for _ in range(n_train + n_heldout)]
        ex = [Example(PROMPT.format(nums=", ".join(map(str, n)), target=t), answer=t, meta={"nums": n}) for n, t in probs]
        self._train, self._heldout = ex[:n_train], ex[n_train:]
        self.max_tokens = max_tokens

    def train_examples(self):
        return self._train

    def heldout_examples(self):
        return self._heldout

    def rewards(self, model, batch):
        return np.array([score(model.generate(ex.prompt, self.max_tokens), ex.meta["nums"], ex.answer) for ex in batch])
