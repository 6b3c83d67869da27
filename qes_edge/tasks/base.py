"""The task interface and the loader for `--task NAME|module:function`.

Tasks produce examples as chat messages, not as model-formatted text: the model (ModelDriver)
renders them through its own chat template and tokenizes them (`driver.prompt_tokens`).  The
model interface tasks use:

- `prompt_tokens(example) -> list[int]`: the example's prompt as tokens (template, prefill, BOS);
- `score(examples, continuations=None)`: yields (index, next-token logits, [log-probabilities of
  each continuation's tokens]) per example, the batch laid out as the run's evaluation layout
  says (one at a time, or many sequences a decode: llama/batched.py);
- `generate_many(token_lists, max_tokens) -> list[str]`: greedy completions, laid out likewise;
- `tokenize(text, add_bos=...)`."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt and what scores it (slots: a task holds thousands of them).

    prompt: the user's text (a one-turn chat), or the whole prompt as given when raw;
    messages: the chat before the answer, a tuple of {"role", "content"} dicts; empty means one
      user turn holding `prompt`;
    prefill: text placed after the template's generation prompt, inside the assistant's turn
      (sentiment's "Answer:"), so the answer is scored or generated right after it;
    raw: the prompt goes to the tokenizer as given, without the chat template (--raw-prompt);
    where: "file:line" of a data example, for messages."""
    prompt: str
    answer: Any = None
    choices: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    messages: tuple = field(default=(), hash=False)
    prefill: str = ""
    raw: bool = False
    where: str = field(default="", hash=False, compare=False)

    def chat(self) -> tuple:
        """The messages to render (one user turn holding the prompt when none were given)."""
        return self.messages or ({"role": "user", "content": self.prompt},)

    def render_key(self) -> tuple:
        """What decides the example's tokens (the driver caches them under it)."""
        if self.raw:
            return ("raw", self.prompt)
        return ("chat", tuple((m["role"], m["content"]) for m in self.chat()), self.prefill)


# -- the fixed train/held-out split -----------------------------------------------------------
# numpy.random.default_rng(seed).permutation(n), computed in Python: the same list, element for
# element (tests/test_tasks_split.py checks it against NumPy), without importing numpy.random
# (its extension modules and Python code are ~2 MB resident in a process that never needs them:
# training draws its seeds and batches with derive.py).  SeedSequence(seed) hashes the seed into
# a PCG64 state; Generator.shuffle is a Fisher-Yates shuffle drawing each index with
# random_interval (masked rejection sampling on PCG64's 32-bit halves).

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1
_SS_INIT_A, _SS_MULT_A, _SS_INIT_B, _SS_MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_SS_MIX_L, _SS_MIX_R = 0xCA01F9DD, 0x4973F715
_PCG64_MULT = 0x2360ED051FC65DA44385DF649FCCF645


def _seed_sequence_words(seed: int, n: int) -> list[int]:
    """numpy.random.SeedSequence(seed).generate_state(n, np.uint32) for an int seed >= 0."""
    entropy = []
    x = seed
    while True:
        entropy.append(x & _M32)
        x >>= 32
        if not x:
            break
    h = _SS_INIT_A

    def hashmix(v):
        nonlocal h
        v = (v ^ h) & _M32
        h = (h * _SS_MULT_A) & _M32
        v = (v * h) & _M32
        return v ^ (v >> 16)

    def mix(a, b):
        r = (_SS_MIX_L * a - _SS_MIX_R * b) & _M32
        return r ^ (r >> 16)

    pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(4, len(entropy)):
        for dst in range(4):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    h = _SS_INIT_B
    out = []
    for i in range(n):
        v = (pool[i % 4] ^ h) & _M32
        h = (h * _SS_MULT_B) & _M32
        v = (v * h) & _M32
        out.append(v ^ (v >> 16))
    return out


def fixed_permutation(seed: int, n: int) -> list[int]:
    """numpy.random.default_rng(seed).permutation(n).tolist(), without numpy.random (see above)."""
    if seed < 0 or n > _M32:  # outside what is written here: ask NumPy
        return np.random.default_rng(seed).permutation(n).tolist()
    w = _seed_sequence_words(seed, 8)
    v = [w[2 * k] | (w[2 * k + 1] << 32) for k in range(4)]
    init, seq = (v[0] << 64) | v[1], (v[2] << 64) | v[3]
    inc = ((seq << 1) | 1) & _M128
    state = (inc + init) & _M128  # srandom: state 0, a step, += init, a step
    state = (state * _PCG64_MULT + inc) & _M128
    buffered = None

    def next32():
        nonlocal state, buffered
        if buffered is not None:
            r, buffered = buffered, None
            return r
        state = (state * _PCG64_MULT + inc) & _M128
        x = ((state >> 64) ^ state) & _M64
        rot = state >> 122
        out = ((x >> rot) | (x << ((-rot) & 63))) & _M64
        buffered = out >> 32
        return out & _M32

    arr = list(range(n))
    for i in range(n - 1, 0, -1):
        mask = i
        for s in (1, 2, 4, 8, 16):
            mask |= mask >> s
        while True:
            j = next32() & mask
            if j <= i:
                break
        arr[i], arr[j] = arr[j], arr[i]
    return arr


class RewardFailure(Exception):
    """A reward that raised or was not a finite number: recorded as a failed member."""


class Task:
    """A task has training examples, held-out examples, and scores a batch on a model."""

    name = "task"

    def train_examples(self) -> Sequence[Example]:
        raise NotImplementedError

    def heldout_examples(self) -> Sequence[Example]:
        raise NotImplementedError

    def test_examples(self) -> Sequence[Example]:
        """Examples scored once at the end of training (a data folder's test.jsonl); none here."""
        return []

    def examples_of(self, split: str) -> Sequence[Example]:
        """The examples `eval --split` scores: heldout (what the run holds out), test, train, or all
        (every example); ValueError for a split this task does not have."""
        if split == "heldout":
            return self.heldout_examples()
        if split == "train":
            return self.train_examples()
        if split == "all":
            return list(self.train_examples()) + list(self.heldout_examples()) + list(self.test_examples())
        if split == "test" and self.test_examples():
            return self.test_examples()
        raise ValueError(f"--split {split}: task {self.name} has no {split} examples (a data folder's "
                         f"{split}.jsonl holds them)")

    def describe_data(self) -> str | None:
        """One line on what is trained on and held out (the data tasks), or None."""
        return None

    def branches_per_prompt(self) -> int:
        """Most continuations a prompt's scoring decodes beside it as branch sequences (the choice
        task's multi-token answers); 0: none, one sequence a prompt (llama/batched.py)."""
        return 0

    def generated_tokens(self) -> int:
        """The most tokens a prompt's completion may take (0: the task scores logits, no generation):
        the batched evaluation's KV cache makes room for them."""
        return 0

    def strata(self) -> Sequence | None:
        """A class label per training example, for class-balanced batches; None: no classes."""
        return None

    def rewards(self, model, batch: Sequence[Example]) -> np.ndarray:
        """One float per example; raises RewardFailure when the reward cannot be computed."""
        raise NotImplementedError

    def evaluate(self, model, examples: Sequence[Example]) -> dict[str, float]:
        r = self.rewards(model, examples)
        return {"reward": float(np.mean(r))}

    def describe(self) -> dict:
        return {"name": self.name}


def auroc(scores, positive) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative
    (ties count half), from the Mann-Whitney rank sum."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # ties share the mean of their ranks (1-based)
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def checked_reward(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RewardFailure(f"{where}: reward {value!r} is not a number") from None
    if not math.isfinite(v):
        raise RewardFailure(f"{where}: reward is {v}")
    return v


def load_callable(spec: str) -> Callable:
    """`module:function`, found as `python -m` finds modules: the current folder first, then the
    installed packages.  A module that is missing says where it was looked for."""
    import os
    import sys
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"expected module:function, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and mod.split(".")[0] == e.name.split(".")[0]:
            raise ValueError(f"cannot load reward {spec!r}: no module {e.name!r} in the current folder ({cwd}) "
                             "or the installed packages") from None
        raise ValueError(f"cannot load reward {spec!r}: importing it failed: {e}") from None
    except Exception as e:  # the user's module raised while importing
        raise ValueError(f"cannot load reward {spec!r}: importing {mod} raised {type(e).__name__}: {e}") from None
    obj = getattr(module, fn, None)
    if obj is None:
        raise ValueError(f"cannot load reward {spec!r}: {module.__file__} has no {fn!r}")
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj


CHOICE_NORMS = ("mean", "sum", "first")
