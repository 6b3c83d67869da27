"""Word polarity from the AFINN lexicon, scored by the logits of the answer (no generation).

Why this task for the proof of learning: SmolLM2-135M-Instruct has headroom on it (it calls
most words positive: 0.66 balanced held-out accuracy, 0.92 on positive words and 0.40 on
negative ones with this prompt), one forward pass per example makes a step
affordable on a 2-core CPU, and evaluation is deterministic, so small differences between
mirrored members are signal, not noise.  Reward: p(correct class) over the two classes."""

from __future__ import annotations

import os

import numpy as np

from qes_edge.tasks.base import Example, Task, auroc, fixed_permutation

# a chat of a system turn and a user turn, rendered by the model's own template, then the
# answer cue "Answer:" inside the assistant's turn.  The word comes last but for the template's
# closing markers and the cue, so everything before it is a token prefix the batch shares:
# evaluated once per member (driver.score), then each example costs its ~12 own tokens.
# For SmolLM2 the rendered text is byte for byte the hand-written ChatML this task used before
# (tests/test_chat.py), so the README's learning results stand.
SYSTEM = "You classify the sentiment of single words."
USER = "Positive or negative?\nWord: {word}"
PREFILL = "Answer:"
CLASSES = {"positive": (" positive", " Positive"), "negative": (" negative", " Negative")}
_CHOICES = tuple(CLASSES)
_SYSTEM_MESSAGE = {"role": "system", "content": SYSTEM}  # shared by every example: never mutated


def afinn_words(min_abs: int = 2) -> list[tuple[str, str]]:
    import importlib.util
    spec = importlib.util.find_spec("afinn")
    if spec is None:
        raise RuntimeError("the sentiment task needs the AFINN lexicon: pip install afinn")
    path = os.path.join(os.path.dirname(spec.origin), "data", "AFINN-en-165.txt")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            word, _, val = line.rstrip("\n").rpartition("\t")
            if word and " " not in word and abs(int(val)) >= min_abs:
                out.append((word, "positive" if int(val) > 0 else "negative"))
    return sorted(out)


class SentimentTask(Task):
    name = "sentiment"

    def __init__(self, seed: int = 0, heldout: int = 200, min_abs: int = 2, raw_prompt: bool = False):
        self.raw_prompt = raw_prompt
        words = afinn_words(min_abs)
        # a fixed split, whatever the run seed: default_rng(12345).permutation, without numpy.random
        order = fixed_permutation(12345, len(words))
        # held out: the first heldout/2 words of each class in that order, so accuracy is not a class prior
        held = set()
        for label in CLASSES:
            held.update([i for i in order if words[i][1] == label][:heldout // 2])
        self._heldout = [self._example(*words[i]) for i in order if i in held]
        self._train = [self._example(*words[i]) for i in order if i not in held]
        self._token_ids = None

    def _example(self, word, label):
        user = USER.format(word=word)
        if self.raw_prompt:  # a base model without a template: the same words as plain text
            return Example(f"{SYSTEM}\n{user}\n{PREFILL}", answer=label, choices=_CHOICES,
                           meta={"word": word}, raw=True)
        # the system turn and the choices are the same objects in every example (thousands of them)
        return Example(user, answer=label, choices=_CHOICES, meta={"word": word},
                       messages=(_SYSTEM_MESSAGE, {"role": "user", "content": user}), prefill=PREFILL)

    def describe(self):
        return {"name": self.name, "raw_prompt": self.raw_prompt}

    def train_examples(self):
        return self._train

    def heldout_examples(self):
        return self._heldout

    def strata(self):
        return [ex.answer for ex in self._train]

    def _ids(self, model):
        if self._token_ids is None:
            self._token_ids = {c: [model.tokenize(v, add_bos=False)[0] for v in variants]
                               for c, variants in CLASSES.items()}
        return self._token_ids

    def probabilities(self, model, batch) -> np.ndarray:
        """p(correct class) per example, from one forward pass each (the shared prefix once)."""
        ids = self._ids(model)
        out = np.empty(len(batch))
        for i, logits, _ in model.score(batch):
            ex = batch[i]
            logits = logits.astype(np.float64)
            sel = {c: logits[v] for c, v in ids.items()}
            top = max(float(x.max()) for x in sel.values())
            mass = {c: float(np.exp(x - top).sum()) for c, x in sel.items()}
            out[i] = mass[ex.answer] / sum(mass.values())
        return out

    def rewards(self, model, batch):
        return self.probabilities(model, batch)

    def evaluate(self, model, examples):
        """Accuracy, per class and balanced, and the AUROC of p(positive): the AUROC does not move
        when only the model's leaning to one class moves, so a rise in it is learned discrimination."""
        p = self.probabilities(model, examples)
        pos = np.array([ex.answer == "positive" for ex in examples])
        acc_pos = float((p[pos] > 0.5).mean()) if pos.any() else float("nan")
        acc_neg = float((p[~pos] > 0.5).mean()) if (~pos).any() else float("nan")
        return {"reward": float(p.mean()), "accuracy": float((p > 0.5).mean()),
                "accuracy_positive": acc_pos, "accuracy_negative": acc_neg,
                "balanced_accuracy": (acc_pos + acc_neg) / 2,
                "auroc": auroc(np.where(pos, p, 1 - p), pos)}
