"""The model driver: a llama.cpp model whose trainable weights libqes edits in place.

At start-up it proves the edits reach the forward pass: perturb one tensor, see the logits of
a fixed prompt change, restore, see them come back bit for bit.  If not, it refuses to train."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import CodeTensor, digest_tensors, sigma_threshold
from ._native import ffi
from .gguf_model import DEFAULT_FROZEN, GGUFModel, trainable_infos
from .llama_runtime import clear, forward, last_logits, load_llama
from .llama_weights import capture_weights, weight_code_tensors
from .quant import QESError

SELF_CHECK_PROMPT = b"The quick brown fox jumps over the lazy dog. The capital of France is"


class SelfCheckFailed(RuntimeError):
    pass


class ModelDriver:
    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None,
                 frozen=DEFAULT_FROZEN, self_check: bool = True):
        self.path = Path(path)
        # our own validation of the file and of every trainable type, before llama.cpp sees it
        planned = trainable_infos(GGUFModel(self.path).header.tensors, frozen)
        self.llm = load_llama(self.path, n_ctx=n_ctx, n_threads=n_threads)
        self.weights = capture_weights(self.llm)
        self.tensors: list[CodeTensor] = weight_code_tensors(self.weights, [t.name for t in planned])
        with open(self.path, "rb") as f:
            for live, disk in zip(self.tensors, planned):
                if (int(live.qtype), live.n_elements, live.n_bytes) != (disk.ggml_type, disk.n_elements, disk.n_bytes):
                    raise QESError(f"tensor {live.name!r}: llama.cpp holds {live.qtype.name} x {live.n_elements} "
                                   f"in {live.n_bytes} bytes, the file says type {disk.ggml_type} x {disk.n_elements}")
                f.seek(disk.offset)
                head = min(4096, live.n_bytes)
                if f.read(head) != bytes(ffi.buffer(live._ptr, head)):
                    raise QESError(f"tensor {live.name!r}: llama.cpp's copy differs from the file (repacked?)")
        self.n_codes = sum(t.n_elements for t in self.tensors)
        if self_check:
            self.self_check()

    # -- evaluation --------------------------------------------------------------------
    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        raw = text.encode() if isinstance(text, str) else text
        return self.llm.tokenize(raw, add_bos=add_bos, special=special)

    def logits(self, tokens) -> np.ndarray:
        """Next-token logits after tokens, from an empty context."""
        forward(self.llm, tokens)
        return last_logits(self.llm)

    def eval_prefix(self, tokens) -> None:
        """Evaluate a prefix shared by several examples, from an empty context; logits_suffix then
        evaluates each example's rest on top of it (the prefix costs once per member, not per example)."""
        forward(self.llm, tokens)
        self._n_prefix = len(tokens)

    def logits_suffix(self, tokens) -> np.ndarray:
        """Next-token logits after prefix + tokens: the context is rolled back to the prefix first."""
        n = getattr(self, "_n_prefix", None)
        if n is None:
            raise RuntimeError("logits_suffix before eval_prefix")
        self.llm.n_tokens = n  # eval() drops every cached position from here on
        self.llm.eval(tokens)
        return last_logits(self.llm)

    def generate(self, prompt: str, max_tokens: int) -> str:
        """Greedy completion from an empty context (no cached prefix survives a weight change)."""
        clear(self.llm)
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]

    def weights_digest(self) -> str:
        return digest_tensors(self.tensors)

    # -- the start-up proof ------------------------------------------------------------
    def self_check(self) -> None:
        tokens = self.tokenize(SELF_CHECK_PROMPT)
        base = self.logits(tokens)
        # first: NaN != NaN, so NaN logits would otherwise be misreported as non-determinism
        if not np.isfinite(base).all():
            bad = int(np.count_nonzero(~np.isfinite(base)))
            raise SelfCheckFailed(f"{self.path.name}: the self-check logits are not finite ({bad} of {base.size} "
                                  "are NaN/inf): the model computes NaN/inf, check its hyperparameters")
        again = self.logits(tokens)
        if not np.array_equal(base, again):
            raise SelfCheckFailed("two evaluations of the same prompt gave different logits: "
                                  "evaluation is not deterministic, rewards would be noise")
        target = max(self.tensors, key=lambda t: t.n_elements)
        digest = self.weights_digest()
        p = target.perturb(1, sigma_threshold(0.05))
        moved = self.logits(tokens)
        p.restore()
        back = self.logits(tokens)
        if np.array_equal(moved, base):
            raise SelfCheckFailed(f"perturbing {target.name} ({p.applied} codes) did not change the logits: "
                                  "the forward pass does not read the tensors qes-edge edits")
        if not np.array_equal(back, base) or self.weights_digest() != digest:
            raise SelfCheckFailed(f"restoring {target.name} did not bring the logits back bit for bit")
