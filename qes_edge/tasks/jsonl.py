"""Tasks over the user's JSONL, one example a line, in any of these formats:

- `{"prompt": "..."}`: one user turn, rendered through the model's chat template;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat (mlx-lm / OpenAI format).  When the
  last message is the assistant's it is the target (the answer jsonl compares against, the right
  choice of `choice` when it is one of the choices) and is not part of the prompt;
- with `raw_prompt` (`--raw-prompt`): `{"prompt": "..."}` goes to the tokenizer as given, without
  the template (base models; prompts that are already formatted).

What scores it: `"answer"` (exact match of the stripped completion; `"completion"` is read as the
answer too, as mlx-lm writes it) or `"pattern"` (a regex searched in the completion), or any
reward callable (prompt, completion, example) -> float; `choice` adds `"choices"`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from qes_edge.tasks.base import CHOICE_NORMS, Example, Task, fixed_permutation
from qes_edge.tasks.data import HELDOUT_FRACTION, SPLITS, data_files


MAX_DATA_BYTES = 1 << 30  # a JSONL of prompts larger than 1 GiB is a mistake, not a task


def _messages(value) -> tuple[dict, ...]:
    """A checked copy of a messages list (ValueError says what is wrong)."""
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise ValueError(f"'messages'[{j}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def parse_example(row, raw_prompt: bool = False, where: str = "") -> Example:
    """One data line as an Example (ValueError without the file:line prefix)."""
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object with 'prompt' or 'messages'")
    answer = row.get("answer", row.get("completion"))
    if "messages" in row:
        if raw_prompt:
            raise ValueError("'messages' needs the model's chat template: give 'prompt' as plain text with "
                             "--raw-prompt, or drop --raw-prompt")
        if "prompt" in row:
            raise ValueError("give either 'prompt' or 'messages', not both")
        msgs = _messages(row["messages"])
        target = None
        if msgs[-1]["role"] == "assistant":
            target, msgs = msgs[-1]["content"], msgs[:-1]
            if not msgs:
                raise ValueError("'messages' holds only the assistant's answer: there is no prompt before it")
            if answer is None:
                answer = target
        users = [m["content"] for m in msgs if m["role"] == "user"]
        prompt = users[-1] if users else msgs[-1]["content"]
        return Example(prompt, answer=answer, meta=row, messages=msgs, where=where)
    if "prompt" not in row:
        raise ValueError("each line needs a string 'prompt' or a list of 'messages' (chat format)")
    if not isinstance(row["prompt"], str):
        raise ValueError("each line needs a string 'prompt' ('prompt' is not a string)")
    if not row["prompt"].strip():
        raise ValueError("'prompt' is empty")
    return Example(row["prompt"], answer=answer, meta=row, raw=raw_prompt, where=where)


def read_jsonl(path: str | Path, raw_prompt: bool = False,
               check: Callable[[Example], None] | None = None, max_line_bytes: int | None = None,
               min_examples: int = 4) -> list[Example]:
    """The examples of a JSONL file; ValueError names the file (and line) on any problem.
    check(example) may refuse an example with a ValueError (its message gets the file:line).

    The file is read a line at a time; a line longer than max_line_bytes (a bound the caller
    derives from the model's context: see training/opening.data_line_limit) is refused from its length
    alone, so that no data file makes the process hold more than one such line."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p}: is not a file (a JSONL file of prompts is expected)")
    out, any_text = [], False
    try:
        if p.stat().st_size > MAX_DATA_BYTES:
            raise ValueError(f"{p}: {p.stat().st_size:,} bytes is larger than the {MAX_DATA_BYTES:,} a data file may have")
        with open(p, "rb") as f:
            i = 0
            while True:
                raw = f.readline(max_line_bytes + 1) if max_line_bytes else f.readline()
                if not raw:
                    break
                i += 1
                if b"\0" in raw:
                    raise ValueError(f"{p}: is a binary file, not JSONL text")
                if max_line_bytes and len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    raise ValueError(f"{p}:{i}: the line is longer than {max_line_bytes:,} bytes, more than any "
                                     "prompt that fits the model's context (raise --n-ctx or shorten it)")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{p}: is not UTF-8 text (line {i}, byte {e.start} of the line), "
                                     "not a JSONL file") from None
                if not line.strip():
                    continue
                any_text = True
                out.append(_example_of_line(line, p, i, raw_prompt, check))
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e.strerror})") from None
    if not any_text:
        raise ValueError(f"{p}: is empty (one JSON object a line is expected)")
    if len(out) < min_examples:
        raise ValueError(f"{p}: needs at least {min_examples} examples, has {len(out)}")
    return out


def _example_of_line(line: str, p: Path, i: int, raw_prompt: bool, check) -> Example:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{p}:{i}: not JSON ({e})") from None
    try:
        ex = parse_example(row, raw_prompt, where=f"{p}:{i}")
        if "pattern" in row:
            if not isinstance(row["pattern"], str):
                raise ValueError("'pattern' must be a string (a regular expression)")
            try:
                re.compile(row["pattern"])
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"'pattern' is not a valid regular expression ({e})") from None
        if check is not None:
            check(ex)
    except ValueError as e:
        raise ValueError(f"{p}:{i}: {e}") from None
    return ex


class JsonlTask(Task):
    """The examples of `--data` (tasks/data.py): one file with a fixed 20% held out (split
    "fixed"), or a folder's train.jsonl with valid.jsonl held out as it is (split "valid"); a
    folder's test.jsonl is read too (test_examples)."""

    name = "jsonl"

    def __init__(self, path, seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION, max_tokens: int = 32,
                 raw_prompt: bool = False, max_line_bytes: int | None = None, split: str = "fixed"):
        self.raw_prompt = raw_prompt
        self.files = data_files(path)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split

        def read(f, at_least=4):
            return read_jsonl(f, raw_prompt, self.check_example, max_line_bytes, at_least)
        ex = read(self.files.train)
        if split == "valid":
            if self.files.valid is None:
                raise ValueError(f"{self.files.path}: the run holds out valid.jsonl, which is not there (it was when "
                                 "the run was recorded)")
            self._train, self._heldout = ex, read(self.files.valid, 1)
        else:
            order = fixed_permutation(999, len(ex))  # default_rng(999).permutation, without numpy.random
            k = max(1, int(len(ex) * heldout_fraction))
            self._heldout = [ex[i] for i in order[:k]]
            self._train = [ex[i] for i in order[k:]]
        self._test = read(self.files.test, 1) if self.files.test is not None else []
        self.max_tokens = max_tokens
        self.path = str(path)

    def check_example(self, ex: Example) -> None:
        """Refuse a data line this task cannot score (ValueError; read_jsonl adds file:line)."""

    def train_examples(self):
        return self._train

    def heldout_examples(self):
        return self._heldout

    def test_examples(self):
        return self._test

    def examples_of(self, split: str):
        if split == "valid" and self.split != "valid":
            raise ValueError(f"--split valid: {self.files.path} has no valid.jsonl" if self.files.valid is None else
                             f"--split valid: this run holds out a fixed 20% of {self.files.train.name}, not valid.jsonl")
        if split == "test" and not self._test:
            raise ValueError(f"--split test: {self.files.path} has no test.jsonl (give --data DIR holding one)")
        return super().examples_of("heldout" if split == "valid" else split)

    def describe_data(self) -> str:
        from qes_edge.tasks.data import describe
        return describe(self.files, self.split, len(self._train), len(self._heldout), len(self._test))

    def generated_tokens(self) -> int:
        return self.max_tokens

    def reward_one(self, ex: Example, completion: str) -> float:
        if "pattern" in ex.meta:
            return 1.0 if re.search(ex.meta["pattern"], completion) else 0.0
        return 1.0 if completion.strip() == str(ex.answer).strip() else 0.0

    def rewards(self, model, batch):
        completions = model.generate_many([model.prompt_tokens(ex) for ex in batch], self.max_tokens)
        return np.array([self.reward_one(ex, c) for ex, c in zip(batch, completions)])

    def describe(self):
        return {"name": self.name, "data": self.path, "split": self.split}


class CallableRewardTask(JsonlTask):
    """Completions of the data's prompts, scored by the user's reward functions (tasks/rewards.py):
    one `module:function`, or several summed with their weights; per example or, in TRL's form,
    per batch.  `last_parts`: each reward's mean over the last batch scored (the executor records
    them per member)."""

    name = "callable"

    def __init__(self, fns, path, seed: int = 0, **kw):
        from qes_edge.tasks.rewards import RewardFn, is_batch
        super().__init__(path, seed=seed, **kw)
        if callable(fns):  # one function: --task module:function
            spec = f"{getattr(fns, '__module__', '?')}:{getattr(fns, '__name__', '?')}"
            if getattr(fns, "batched", False) and not is_batch(fns):
                raise ValueError(f"{spec}: `batched = True` (prompts, completions, examples) is replaced by TRL's "
                                 "order: write fn(completions, prompts, examples), or mark it with "
                                 "@qes_edge.batch_reward")
            fns = [RewardFn(spec, 1.0, fns, is_batch(fns))]
        self.reward_fns = list(fns)
        self.fn = self.reward_fns[0].fn
        self.last_parts: dict[str, float] | None = None

    def rewards(self, model, batch):
        from qes_edge.tasks.rewards import score
        completions = model.generate_many([model.prompt_tokens(ex) for ex in batch], self.max_tokens)
        self.last_parts = None
        total, parts = score(self.reward_fns, [ex.prompt for ex in batch], completions, [ex.meta for ex in batch])
        if len(self.reward_fns) > 1:
            self.last_parts = parts
        return total

    def evaluate(self, model, examples):
        r = self.rewards(model, examples)
        out = {"reward": float(np.mean(r))}
        for name, v in (self.last_parts or {}).items():
            out[f"reward {name}"] = v
        return out

    def describe(self):
        return {"name": ",".join(f"{r.spec}={r.weight:g}" for r in self.reward_fns), "data": self.path}


class ChoiceTask(JsonlTask):
    """Multiple choice from JSONL: a prompt (any format above), "choices": [...] and "answer": the
    index of the right one (or, in chat format, the last assistant message equal to one of the
    choices).  No generation.

    Scoring: each choice is tokenized on its own, without BOS, and appended to the prompt's tokens
    (the template's generation prompt and any prefill included), so write the choices as the
    model would begin its answer: "Paris" after a chat template, " Paris" after a raw prompt
    ending in "Answer:".  Its score is the log-probability of its whole token sequence after the
    prompt, normalised by `choice_norm`:
      "mean" (default): per token, the mean log-probability; long and short choices compete evenly;
      "sum": the total log-probability, the probability of the whole answer (favours short choices);
      "first": the first token's only (what qes-edge did before whole-answer scoring; kept so that
        runs recorded then resume as they were).
    Choices that share their first tokens ("New York" / "New Delhi") are told apart by the rest.
    Reward: the softmax of the scores over the choices, taken at the right one; evaluate adds
    accuracy (the right choice scores highest).
    Cost per member: the prompt once (a prefix the batch shares once in all), then each choice of
    more than one token: its tokens but the last, logits at every position (one at a time: a
    decode per choice, the context rolled back to the prompt after each; batched: a branch
    sequence of the prompt in the same decodes, llama/batched.py)."""

    name = "choice"

    def __init__(self, path, seed: int = 0, choice_norm: str = "mean", **kw):
        if choice_norm not in CHOICE_NORMS:
            raise ValueError(f"choice_norm must be one of {', '.join(CHOICE_NORMS)}, got {choice_norm!r}")
        self.choice_norm = choice_norm
        super().__init__(path, seed=seed, **kw)
        self._choice_tokens: dict[str, list[int]] = {}

    def check_example(self, ex: Example) -> None:
        ch = ex.meta.get("choices")
        if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
            raise ValueError("every line needs 'choices', a list of at least two non-empty strings")
        dup = sorted({c for c in ch if ch.count(c) > 1})
        if dup:
            raise ValueError(f"'choices' lists {', '.join(map(repr, dup))} more than once")
        ans = ex.meta.get("answer")
        if ans is None and ex.answer in ch:  # chat format: the assistant's answer is one of the choices
            ans = ch.index(ex.answer)
        if not (isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(ch)):
            raise ValueError(f"'answer' must be the index of the right choice (got {ans!r})")

    @staticmethod
    def answer_index(ex: Example) -> int:
        ans = ex.meta.get("answer")
        return ans if isinstance(ans, int) else ex.meta["choices"].index(ex.answer)

    def generated_tokens(self) -> int:
        return 0  # scored by log-probabilities: nothing is generated

    def branches_per_prompt(self) -> int:
        # as many as a round gives a prompt: llama/batched.SEQS_PER_PROMPT - 1 (test_batched_eval checks it)
        return 0 if self.choice_norm == "first" else 3

    def tokens_of(self, model, choice: str) -> list[int]:
        got = self._choice_tokens.get(choice)
        if got is None:
            got = self._choice_tokens[choice] = list(model.tokenize(choice, add_bos=False))
            if not got:
                raise ValueError(f"choice {choice!r} has no tokens")
        return got

    def choice_scores(self, model, batch) -> list[np.ndarray]:
        """The normalised log-probability of every choice of every example in batch."""
        out = [None] * len(batch)
        first = self.choice_norm == "first"  # the raw logit, exactly as before (softmax is shift-free)
        conts = None if first else (lambda i: [self.tokens_of(model, c) for c in batch[i].meta["choices"]])
        for i, logits, lps in model.score(batch, conts):
            if first:
                scores = [float(logits[self.tokens_of(model, c)[0]]) for c in batch[i].meta["choices"]]
            else:
                scores = [lp.mean() if self.choice_norm == "mean" else lp.sum() for lp in lps]
            out[i] = np.array(scores, np.float64)
        return out

    @staticmethod
    def p_correct(scores: np.ndarray, answer: int) -> float:
        p = np.exp(scores - scores.max())
        return float(p[answer] / p.sum())

    def strata(self):
        return [self.answer_index(ex) for ex in self._train]

    def rewards(self, model, batch):
        return np.array([self.p_correct(s, self.answer_index(ex))
                         for s, ex in zip(self.choice_scores(model, batch), batch)])

    def evaluate(self, model, examples):
        scores = self.choice_scores(model, examples)
        p = [self.p_correct(s, self.answer_index(ex)) for s, ex in zip(scores, examples)]
        hits = [int(np.argmax(s)) == self.answer_index(ex) for s, ex in zip(scores, examples)]
        return {"reward": float(np.mean(p)), "accuracy": float(np.mean(hits))}

    def describe(self):
        return {"name": self.name, "data": self.path, "choice_norm": self.choice_norm}
