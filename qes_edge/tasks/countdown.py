"""Countdown as in the paper: reach a target with the given numbers and + - * /.

Reward (format + answer): 0.1 for an <answer>...</answer> that parses as arithmetic, 1.0 when it
uses each given number exactly once and equals the target.  Generated, so it needs generation:
slower than the logit tasks on a CPU.

Scoring is linear in a bounded input, whatever the model writes: only the first
MAX_COMPLETION_CHARS characters of a completion are looked at, and the answer is found with
str.find / str.rfind (a lazy regex such as ``<answer>(.*?)</answer>`` rescans the rest of the text
from every unclosed ``<answer>``: 16000 of them took 28-52 s, 200000 over ten minutes).

Which answer counts: the *first closed* one, i.e. the text between the first ``</answer>`` and
the last ``<answer>`` before it.  Anything after that first closing tag is ignored, an
``<answer>`` never closed (within the cap) gives 0, and so does a ``</answer>`` with no opening
tag before it.  Of the answer, the part before the first ``=`` is the expression ("3+5 = 8");
whitespace and newlines inside it are allowed (safe_arith.evaluate)."""

from __future__ import annotations

import numpy as np

from qes_edge.tasks.base import Example, Task
from qes_edge.tasks.safe_arith import UnsafeExpression, evaluate

# one user turn, rendered by the model's own chat template (raw_prompt: given as plain text)
PROMPT = ("Using the numbers {nums}, create an equation that equals {target}. "
          "You can use + - * / and each number once. Show the equation in <answer> </answer> tags.")
OPEN, CLOSE = "<answer>", "</answer>"
# far more than any answer within CountdownTask.max_tokens (64 tokens are a few hundred
# characters); bounds the work of score() to microseconds whatever the completion
MAX_COMPLETION_CHARS = 4096


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


def extract_answer(completion: str) -> str | None:
    """The first closed answer's text (see the module docstring), or None; linear in the first
    MAX_COMPLETION_CHARS characters, which are all it looks at."""
    if not isinstance(completion, str):
        return None
    text = completion[:MAX_COMPLETION_CHARS]
    end = text.find(CLOSE)
    if end < 0:
        return None
    start = text.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(OPEN):end]


def score(completion: str, nums: list[int], target: int) -> float:
    """1.0 right answer, 0.1 parsable arithmetic that is not it, 0.0 otherwise."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    expr = answer.split("=", 1)[0]
    try:
        value, used = evaluate(expr)
    except UnsafeExpression:
        return 0.0
    if sorted(used) == sorted(nums) and value == target:
        return 1.0
    return 0.1


class CountdownTask(Task):
    name = "countdown"

    def __init__(self, seed: int = 0, n_train: int = 2000, n_heldout: int = 100, max_tokens: int = 64,
                 raw_prompt: bool = False):
        rng = np.random.default_rng(777)  # fixed problems, whatever the run seed
        probs = [make_problem(rng) for _ in range(n_train + n_heldout)]
        ex = [Example(PROMPT.format(nums=", ".join(map(str, n)), target=t), answer=t, meta={"nums": n},
                      raw=raw_prompt) for n, t in probs]
        self._train, self._heldout = ex[:n_train], ex[n_train:]
        self.max_tokens = max_tokens

    def train_examples(self):
        return self._train

    def heldout_examples(self):
        return self._heldout

    def generated_tokens(self) -> int:
        return self.max_tokens

    def rewards(self, model, batch):
        completions = model.generate_many([model.prompt_tokens(ex) for ex in batch], self.max_tokens)
        return np.array([score(c, ex.meta["nums"], ex.answer) for ex, c in zip(batch, completions)])
