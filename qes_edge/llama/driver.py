"""The model driver: a llama.cpp model whose trainable weights libqes edits in place.

At start-up it proves the edits reach the forward pass: perturb one tensor, see the logits of
a fixed prompt change, restore, see them come back bit for bit.  If not, it refuses to train."""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

import numpy as np

from qes_edge.gguf.check import prompt_byte_limit
from qes_edge.gguf.model import DEFAULT_FROZEN, GGUFModel, trainable_infos
from qes_edge.llama import batched
from qes_edge.llama.batched import log_softmax
from qes_edge.llama.chat import ChatTemplateError, load_template
from qes_edge.llama.runtime import clear, decode_rows, forward, last_logits, load_llama
from qes_edge.llama.placement import check_offload
from qes_edge.llama.weights import capture_model_weights, weight_code_tensors
from qes_edge.native.engine import CodeTensor, digest_tensors, sigma_threshold
from qes_edge.native.quant import QESError

SELF_CHECK_PROMPT = b"The quick brown fox jumps over the lazy dog. The capital of France is"


class SelfCheckFailed(RuntimeError):
    pass


def shared_prefix_len(token_lists) -> int:
    """Length of the longest common prefix of token_lists, leaving at least two tokens of each
    (llama.cpp computes a one-token batch on another path, whose last bits differ from a full
    evaluation's); 0 when that is shorter than two tokens (the same reason)."""
    n = batched.shared_prefix(token_lists, keep=2)
    return n if n >= 2 else 0


class ModelDriver:
    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None,
                 frozen=DEFAULT_FROZEN, self_check: bool = True, gpu_layers: int = 0):
        """gpu_layers: layers llama.cpp offloads to the GPU (placement.ALL_LAYERS: every one; 0:
        none); each trainable tensor is then edited where it lives (llama/placement.py)."""
        self.path = Path(path)
        check_offload(gpu_layers)
        self.gpu_layers = gpu_layers
        self.layout = batched.EvalLayout()  # one at a time until use_layout sizes a batched cache
        self.kv_cells = 0  # the batched evaluation's KV cache (use_layout); 0: one at a time
        self.on_prompt = None  # called once per prompt evaluated or generated from (progress bars)
        # our own validation of the file and of every trainable type, before llama.cpp sees it
        header = GGUFModel(self.path).header
        planned = trainable_infos(header.tensors, frozen)
        # the weights are found on a throwaway context before llama-cpp-python makes its own:
        # its buffers are freed before the real context's are allocated (not held beside them)
        found: dict = {}
        # bytes a KV cell takes for each KV type (the header itself is not kept: its vocabulary is MBs)
        self._cell_bytes = {k: batched.kv_bytes_per_cell(header.metadata, k) for k in batched.KV_TYPES}
        self.llm = load_llama(self.path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=gpu_layers,
                              before_context=lambda model, n: found.update(capture_model_weights(model, n)))
        # the model's own chat template, with its vocabulary's BOS/EOS texts (None: it has none)
        self.chat = load_template(self.path, header.metadata, self.llm._model.token_get_text)
        self.bos = self.llm.token_bos()
        self.add_bos = bool(self.llm._model.add_bos_token()) and self.bos >= 0
        # digest of example.render_key() -> its tokens as C ints (4 bytes a token: a tuple of
        # Python ints costs 36, and check_prompts fills this with every example of the task)
        self._prompt_cache: dict[bytes, array] = {}
        # a prompt of more bytes than this cannot fit the context: refused before it is tokenized
        # a prompt's limit: the context as llama.cpp made it (padded to 256), whatever cache use_layout makes later
        self.n_ctx = self.llm.n_ctx()
        self.max_prompt_bytes = prompt_byte_limit(header, self.n_ctx)
        self.weights = found
        self.tensors: list[CodeTensor] = weight_code_tensors(self.weights, [t.name for t in planned])
        with open(self.path, "rb") as f:
            for live, disk in zip(self.tensors, planned):
                if (int(live.qtype), live.n_elements, live.n_bytes) != (disk.ggml_type, disk.n_elements, disk.n_bytes):
                    raise QESError(f"tensor {live.name!r}: llama.cpp holds {live.qtype.name} x {live.n_elements} "
                                   f"in {live.n_bytes} bytes, the file says type {disk.ggml_type} x {disk.n_elements}")
                f.seek(disk.offset)
                head = min(4096, live.n_bytes)
                if f.read(head) != live.read_bytes(0, head):
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

    def generate(self, prompt, max_tokens: int) -> str:
        """Greedy completion of prompt (tokens, or text tokenized as a raw prompt) from an empty
        context (no cached prefix survives a weight change)."""
        tokens = list(prompt) if not isinstance(prompt, (str, bytes)) else self._with_bos(
            self.tokenize(prompt, add_bos=False))
        clear(self.llm)
        if self.on_prompt is not None:
            self.on_prompt()
        out = self.llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]

    # -- prompts: the model's chat template, tokens, shared prefixes ---------------------
    def _with_bos(self, tokens: list[int]) -> list[int]:
        """The BOS rule: BOS is put first only when the model asks for one (the GGUF's
        tokenizer.ggml.add_bos_token, as llama.cpp reads it) and the text did not already start
        with it (a template that writes {{ bos_token }} put it there itself)."""
        if self.add_bos and (not tokens or tokens[0] != self.bos):
            return [self.bos] + tokens
        return tokens

    def render(self, example) -> str:
        """The text of an example's prompt: the model's chat template over its messages, with the
        generation prompt, then the example's prefill; a raw example's prompt as given."""
        if example.raw:
            return example.prompt
        if self.chat is None:
            where = f" ({example.where})" if example.where else ""
            raise ChatTemplateError(f"{self.path.name}: the model has no chat template (tokenizer.chat_template) "
                                    f"to format the prompts{where}; give plain text with --raw-prompt")
        return self.chat.render(example.chat()) + example.prefill

    def prompt_tokens(self, example) -> list[int]:
        """tokenize(render(example)), special tokens parsed (the template's markers are tokens, not
        text), with the BOS rule of _with_bos.  Cached per example: rendering does not depend on
        the weights.  A prompt that leaves no room in the context is refused."""
        # keyed by a 128-bit digest of the render key (49 bytes, where the key's tuples cost ~230)
        key = hashlib.blake2b(repr(example.render_key()).encode(), digest_size=16).digest()
        got = self._prompt_cache.get(key)
        if got is None:
            text = self.render(example)
            self._refuse_long_text(text, example)
            tokens = self._with_bos(self.tokenize(text, add_bos=False, special=True))
            if not tokens:
                raise QESError(f"{example.where or 'an example'}: the prompt is empty (no tokens)")
            if len(tokens) >= self.n_ctx:
                where = f"{example.where}: " if example.where else ""
                raise QESError(f"{where}the prompt is {len(tokens)} tokens, the context holds {self.n_ctx} "
                               "(raise --n-ctx or shorten the prompt)")
            got = self._prompt_cache[key] = array("i", tokens)
        return list(got)

    def _refuse_long_text(self, text: str, example) -> None:
        """A prompt text longer in bytes than any n_ctx tokens of this vocabulary decode to is
        refused from its length, before tokenizing it (which would cost memory in proportion)."""
        limit = self.max_prompt_bytes
        if limit is None or len(text) * 4 <= limit:
            return
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > limit:
            where = f"{example.where}: " if example.where else ""
            raise QESError(f"{where}the prompt is {n:,} bytes, more than {self.n_ctx} tokens of this model "
                           f"can hold (at most {limit:,} bytes): the context holds {self.n_ctx} "
                           "(raise --n-ctx or shorten the prompt)")

    def check_prompts(self, examples) -> int:
        """Render and tokenize every example up front (a missing or failing template, a prompt too
        long for the context: refused before any work); returns the longest prompt in tokens."""
        return max((len(self.prompt_tokens(ex)) for ex in examples), default=0)

    # -- the batched evaluation (llama/batched.py) -------------------------------------------
    def use_layout(self, layout: batched.EvalLayout, examples=(), cells: int | None = None,
                   generated: int = 0) -> int:
        """Evaluate with `layout` from now on.  A batched layout replaces the context with one KV
        cache shared by a round's sequences, sized from the examples' real token counts (the
        layout.sequences longest prompts, each with room for `generated` tokens of completion,
        a quarter more for choice branches; at least n_ctx), unless `cells` is given.  Returns the
        cache's cells.  Call it after the self-check: one at a time is what the self-check proves."""
        layout.check()
        self.layout = layout
        if not layout.batched:
            if self.kv_cells:  # back to llama.cpp's own one-sequence context of n_ctx cells
                batched.resize_context(self.llm, self.n_ctx, layout)
                self.kv_cells = 0
            return 0
        if cells is None:
            longest = sorted((len(self.prompt_tokens(ex)) + generated for ex in examples),
                             reverse=True)[:layout.sequences]
            cells = max(self.n_ctx, -(-sum(longest) * 5 // 4))
        cells = -(-int(cells) // 256) * 256  # llama.cpp pads the cache to 256 cells
        batched.resize_context(self.llm, cells, layout)
        self.kv_cells = self.llm._ctx.n_ctx()
        return self.kv_cells

    def describe_layout(self) -> str:
        """One line on how the evaluation is laid out and what its KV cache costs (shown at start)."""
        lay = self.layout
        if not lay.batched:
            return (f"evaluation: one prompt a decode (--eval-batch 1); KV cache {self.n_ctx} tokens, "
                    f"{self.kv_bytes_for(self.n_ctx) / 2**20:.1f} MiB")
        return (f"evaluation: up to {lay.sequences} prompts a decode (--eval-batch {lay.sequences}), n_batch {lay.n_batch}, "
                f"n_ubatch {lay.n_ubatch}; KV cache {self.kv_cells} tokens ({lay.kv_type}), {self.kv_bytes / 2**20:.1f} MiB, "
                f"against {self.kv_bytes_for(self.n_ctx, lay.kv_type) / 2**20:.1f} MiB one at a time")

    @property
    def kv_bytes(self) -> int:
        """Bytes of the batched evaluation's KV cache (0: one at a time, llama.cpp's own n_ctx cache)."""
        return self.kv_cells * self._cell_bytes[self.layout.kv_type]

    def kv_bytes_for(self, cells: int, kv_type: str = "f16") -> int:
        return cells * self._cell_bytes[kv_type]

    def score(self, examples, continuations=None):
        """Yield (index, next-token logits after the prompt, [log-probabilities of each
        continuation's tokens, float64]) for every example, in order.  continuations(i) lists the
        token lists to score after example i's prompt (None: none).  One at a time, this is
        prompt_logits and continuation_logprobs, bit for bit as before; batched, the rounds of
        llama/batched.py.  The logits are valid until the next item (batched: a copy)."""
        conts = [list(continuations(i)) if continuations else [] for i in range(len(examples))]
        if not self.layout.batched:
            for i, _, logits in self.prompt_logits(examples):
                yield i, logits, [self.continuation_logprobs(logits, c) for c in conts[i]]
            return
        prompts = [self.prompt_tokens(ex) for ex in examples]
        for i, logits, lps in batched.run_rounds(self.llm, self.layout, prompts, conts, self.kv_cells):
            if self.on_prompt is not None:
                self.on_prompt()
            yield i, logits, lps

    def generate_many(self, prompts, max_tokens: int) -> list[str]:
        """Greedy completions of every prompt (token lists), in order: one at a time through
        generate, or batched (llama/batched.generate_rounds)."""
        if not self.layout.batched:
            return [self.generate(p, max_tokens) for p in prompts]
        prompts = [list(p) for p in prompts]
        out = batched.generate_rounds(self.llm, self.layout, prompts, max_tokens, self.kv_cells)
        if self.on_prompt is not None:
            for _ in prompts:
                self.on_prompt()
        return out

    def prompt_logits(self, examples):
        """Yield (index, tokens, next-token logits) for each example's prompt.

        The longest token prefix all the examples share (the template's system turn and the
        like, leaving at least one token per example) is evaluated once from an empty context;
        each example then rolls the context back to it and evaluates only its own rest.  The
        logits are identical to a full evaluation of each prompt (tests/test_chat.py).  While the
        caller holds an item (and until the next evaluation) the context holds that example's prompt,
        for continuation_logprobs."""
        toks = [self.prompt_tokens(ex) for ex in examples]
        if not toks:
            return
        n = shared_prefix_len(toks)
        if n:
            forward(self.llm, toks[0][:n])
        for i, t in enumerate(toks):
            if n:
                self.llm.n_tokens = n  # eval() drops every cached position from here on
                self.llm.eval(t[n:])
            else:
                forward(self.llm, t)
            self._prompt = t
            if self.on_prompt is not None:
                self.on_prompt()
            yield i, t, last_logits(self.llm)

    def continuation_logprobs(self, logits: np.ndarray, tokens) -> np.ndarray:
        """Log-probability of each of tokens in turn after the prompt prompt_logits just yielded
        (whose next-token logits are `logits`): tokens[0] from those logits, the rest from ONE
        batched decode of the prompt's last token and tokens[:-1] with logits at every position
        (llama_runtime.decode_rows; the last prompt token goes again so that no batch is a single
        token).  Each equals the log-softmax of a full evaluation of prompt + tokens[:j] bit for
        bit (tests/test_chat.py).  The context is left holding the prompt but its last token, so
        any number of continuations of the same prompt may follow.  float64."""
        tokens = [int(t) for t in tokens]
        out = np.empty(len(tokens))
        if not tokens:
            return out
        out[0] = log_softmax(logits)[tokens[0]]
        if len(tokens) > 1:
            prompt = getattr(self, "_prompt", None)
            n = len(prompt) - 1 if prompt else -1
            if n < 0 or self.llm.n_tokens < n or self.llm.input_ids[:n].tolist() != prompt[:-1]:
                raise RuntimeError("continuation_logprobs outside prompt_logits (the context holds another prompt)")

            def row(j, lg):
                if j >= 1:  # row 0 is the prompt's last token again: `logits` has it
                    out[j] = log_softmax(lg)[tokens[j]]
            decode_rows(self.llm, n, [prompt[-1]] + tokens[:-1], row)
        return out

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
        # the largest tensor of each memory (host, and a device's when layers are offloaded), one at a
        # time: each placement in use is shown to reach the forward pass and to come back exactly
        digest = self.weights_digest()
        for where in dict.fromkeys(t.resident for t in self.tensors):
            target = max((t for t in self.tensors if t.resident == where), key=lambda t: t.n_elements)
            p = target.perturb(1, sigma_threshold(0.05))
            moved = self.logits(tokens)
            p.restore()
            back = self.logits(tokens)
            place = f" (in {where} memory)" if where else ""
            if np.array_equal(moved, base):
                raise SelfCheckFailed(f"perturbing {target.name}{place} ({p.applied} codes) did not change the logits: "
                                      "the forward pass does not read the tensors qes-edge edits")
            if not np.array_equal(back, base) or self.weights_digest() != digest:
                raise SelfCheckFailed(f"restoring {target.name}{place} did not bring the logits back bit for bit")
