"""Many prompts in one `llama_decode`: a member's batch scored and generated as parallel sequences.

One at a time (`--eval-batch 1`, and every run recorded before it existed), ModelDriver evaluates
the batch's shared prefix once and then each prompt's rest in its own decode.  Here the prompts
of a *round* (at most `EvalLayout.sequences` of them, as many as the KV cache holds) go into the
same decodes as sequences of one unified KV cache:

- the shared prefix once, every token tagged with every sequence of the round (llama.cpp keeps
  one cell for it, shared: no copy);
- each prompt's own rest, tagged with its sequence and its branches', logits only at its last
  token;
- each continuation to score (a choice's tokens but the last) as a branch: its own sequence,
  which shares the prompt's cells and adds its tokens, logits at every one of them.

The token list is cut into decodes of at most `n_batch` tokens and `n_seq_max` logit rows
(llama.cpp's output buffer is n_seq_max rows and never grows past it).  llama.cpp's results
depend on how a batch is laid out (which tokens share a decode and a ubatch), not on timing:
the same layout gives the same bits, run after run and process after process, and the layout is
part of the run config (training/config.py: eval_batch, n_batch, n_ubatch, kv_type)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

#: seq ids a round may use per prompt it holds (the prompt and its branches): llama.cpp's output
#: buffer holds n_seq_max rows of n_vocab floats, so n_seq_max is kept to a few per prompt
SEQS_PER_PROMPT = 4
LLAMA_MAX_SEQ = 256  # llama.cpp's bound on n_seq_max (src/llama-cparams.h)
KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml type ids a run may record for its KV cache
KV_TYPE_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}


@dataclass(frozen=True)
class EvalLayout:
    """How a member's evaluation is laid out in llama.cpp: what decides its bits (recorded)."""
    sequences: int = 1   # prompts per round; 1: one at a time, each in its own decode (the old path)
    n_batch: int = 512   # tokens per llama_decode
    n_ubatch: int = 512  # tokens per compute graph (llama.cpp splits a decode into these)
    kv_type: str = "f16"
    #: seq ids per prompt: the prompt and its branches (a choice task's multi-token answers); 1
    #: for a task without branches, whose output buffer then holds one row a prompt (Gemma's
    #: 262k-token vocabulary: 1 MiB a row).  Derived from the task, not recorded: the rounds and
    #: decodes of a task are the same whatever it is, as long as it covers the task's branches
    seqs_per_prompt: int = SEQS_PER_PROMPT

    @property
    def batched(self) -> bool:
        return self.sequences > 1

    @property
    def n_seq_max(self) -> int:
        return min(LLAMA_MAX_SEQ, max(1, self.sequences * self.seqs_per_prompt)) if self.batched else 1

    def check(self) -> None:
        if not 1 <= self.sequences <= LLAMA_MAX_SEQ // SEQS_PER_PROMPT:
            raise ValueError(f"eval_batch must be in [1, {LLAMA_MAX_SEQ // SEQS_PER_PROMPT}] sequences, "
                             f"got {self.sequences}")
        if not 2 <= self.n_ubatch <= self.n_batch:
            raise ValueError(f"n_ubatch must be in [2, n_batch={self.n_batch}], got {self.n_ubatch}")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {self.kv_type!r}")


def kv_bytes_per_cell(metadata: dict, kv_type: str = "f16") -> int:
    """Bytes one KV cell (one token of one sequence) takes over all layers, from the GGUF's
    hyperparameters: layers x (K + V) x kv heads x head size x bytes per element."""
    from qes_edge.gguf.check import arch_value

    def get(key, default=None):
        return arch_value(metadata, key, default)
    n_layer = int(get("block_count"))
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_k = int(get("attention.key_length", n_embd // n_head))
    head_v = int(get("attention.value_length", n_embd // n_head))
    return int(n_layer * n_head_kv * (head_k + head_v) * KV_TYPE_BYTES[kv_type])


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


# -- planning: which prompts share a round, how a round's tokens are cut into decodes ----------

@dataclass
class _Token:
    token: int
    pos: int
    seqs: tuple[int, ...]
    out: tuple | None  # None: no logits; ("prompt", i) or ("branch", i, c, j)


def shared_prefix(token_lists, keep: int = 1) -> int:
    """Longest common token prefix of token_lists, leaving at least `keep` tokens of each (the
    last one gives the prompt's logits)."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - keep
    for t in token_lists[1:]:
        k = 0
        while k < n and t[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def round_cells(prompts, branches, prefix: int, extra: int = 0) -> int:
    """KV cells a round needs: the prefix once, each prompt's rest and `extra` cells after it (a
    completion's tokens), each branch's tokens."""
    return (prefix + sum(len(p) - prefix + extra for p in prompts)
            + sum(len(b) for bs in branches for b in bs))


def plan_rounds(prompts, branches, layout: EvalLayout, cells: int, extra: int = 0) -> list[list[int]]:
    """The prompts' indices cut into rounds, in order: each at most layout.sequences prompts, at
    most n_seq_max sequences (prompts and branches) and at most `cells` KV cells (the prefix
    counted as shared by the round's prompts, `extra` cells after each prompt for generation).
    A deterministic function of its arguments."""
    rounds, cur = [], []
    for i in range(len(prompts)):
        trial = cur + [i]
        seqs = sum(1 + len(branches[j]) for j in trial)
        need = round_cells([prompts[j] for j in trial], [branches[j] for j in trial],
                           shared_prefix([prompts[j] for j in trial]), extra)
        if cur and (len(trial) > layout.sequences or seqs > layout.n_seq_max or need > cells):
            rounds.append(cur)
            trial = [i]
            seqs = 1 + len(branches[i])
            need = round_cells([prompts[i]], [branches[i]], 0, extra)
        if seqs > layout.n_seq_max or need > cells:
            raise ValueError(f"prompt {i}: {need} tokens in {seqs} sequences do not fit the evaluation's "
                             f"KV cache ({cells} cells, {layout.n_seq_max} sequences)")
        cur = trial
    if cur:
        rounds.append(cur)
    return rounds


def round_tokens(prompts, branches, members: list[int]) -> list[_Token]:
    """The tokens of one round in decode order: the shared prefix (every sequence), then each
    prompt's rest (its sequence and its branches') and its branches (their own)."""
    seq_of, nxt = {}, 0
    for i in members:
        seq_of[i] = nxt
        nxt += 1 + len(branches[i])
    prefix = shared_prefix([prompts[i] for i in members])
    every = tuple(range(nxt))
    out = [_Token(t, p, every, None) for p, t in enumerate(prompts[members[0]][:prefix])]
    for i in members:
        s = seq_of[i]
        mine = tuple(range(s, s + 1 + len(branches[i])))
        p = prompts[i]
        for k in range(prefix, len(p)):
            out.append(_Token(p[k], k, mine, ("prompt", i) if k == len(p) - 1 else None))
        for c, b in enumerate(branches[i]):
            for j, t in enumerate(b):
                out.append(_Token(t, len(p) + j, (s + 1 + c,), ("branch", i, c, j)))
    return out


def cut_decodes(tokens: list[_Token], n_batch: int, max_rows: int) -> list[list[_Token]]:
    """Consecutive slices of at most n_batch tokens and max_rows logit rows (a one-token slice
    takes llama.cpp's one-token path: other bits than a longer one, the same every time)."""
    out, cur, rows = [], [], 0
    for t in tokens:
        r = t.out is not None
        if cur and (len(cur) + 1 > n_batch or rows + r > max_rows):
            out.append(cur)
            cur, rows = [], 0
        cur.append(t)
        rows += r
    if cur:
        out.append(cur)
    return out


# -- llama.cpp: the context, the batch, the decodes ------------------------------------------

def _C():
    from llama_cpp import llama_cpp as C
    return C


def resize_context(llm, cells: int, layout: EvalLayout) -> None:
    """Replace llm's context with one of `cells` KV cells in one unified cache shared by up to
    layout.n_seq_max sequences, of the layout's batch sizes and KV type.  The old context is freed
    first (its buffers are not held beside the new one's); the weights live in the model and are
    untouched.  llm's own one-sequence calls (eval, create_completion) keep working on sequence 0."""
    from llama_cpp import _internals as internals
    params = llm.context_params
    params.n_ctx = int(cells)
    params.n_batch = layout.n_batch
    params.n_ubatch = layout.n_ubatch
    params.n_seq_max = layout.n_seq_max
    params.kv_unified = layout.batched
    params.type_k = params.type_v = KV_TYPES[layout.kv_type]
    llm._ctx.close()
    llm._ctx = llm._stack.enter_context(contextlib.closing(
        internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)))
    llm.n_batch = layout.n_batch
    llm._batch.close()
    llm._batch = llm._stack.enter_context(contextlib.closing(
        internals.LlamaBatch(n_tokens=layout.n_batch, embd=0, n_seq_max=1, verbose=llm.verbose)))
    llm.input_ids = np.ndarray((llm._ctx.n_ctx(),), dtype=np.intc)
    llm.n_tokens = 0


class SeqBatch:
    """A llama_batch of up to n_tokens tokens, each in up to n_seq sequences."""

    def __init__(self, n_tokens: int, n_seq: int):
        self.C = _C()
        self.batch = self.C.llama_batch_init(n_tokens, 0, n_seq)
        self.cap = n_tokens

    def fill(self, tokens) -> None:
        b = self.batch
        if len(tokens) > self.cap:
            raise ValueError(f"{len(tokens)} tokens in a batch of {self.cap}")
        for k, t in enumerate(tokens):
            b.token[k] = t.token
            b.pos[k] = t.pos
            b.n_seq_id[k] = len(t.seqs)
            for j, s in enumerate(t.seqs):
                b.seq_id[k][j] = s
            b.logits[k] = t.out is not None
        b.n_tokens = len(tokens)

    def fill_simple(self, toks, pos, seqs) -> None:
        """One token per sequence, every one with logits (generation's step)."""
        b = self.batch
        for k, (t, p, s) in enumerate(zip(toks, pos, seqs)):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = t, p, 1, 1
            b.seq_id[k][0] = s
        b.n_tokens = len(toks)

    def close(self) -> None:
        if self.batch is not None:
            self.C.llama_batch_free(self.batch)
            self.batch = None


def decode(llm, batch: SeqBatch) -> None:
    rc = _C().llama_decode(llm.ctx, batch.batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed ({rc}): the batch does not fit the context")


def clear_memory(llm) -> None:
    llm.reset()
    _C().llama_memory_clear(_C().llama_get_memory(llm.ctx), True)


def run_rounds(llm, layout: EvalLayout, prompts, conts, cells: int):
    """Score prompts and continuations in rounds (see the module docstring).  conts[i] lists the
    continuations of prompt i whose log-probabilities are wanted.  Yields, per prompt in order,
    (i, logits after the prompt (float32 copy), [float64 log-probabilities of each continuation's
    tokens]) once its round is decoded; at most one round's prompt logits are held at a time."""
    C = _C()
    # the continuations of more than one token branch: their tokens but the last, as sequences
    multi = [[k for k, c in enumerate(cs) if len(c) > 1] for cs in conts]
    branches = [[list(conts[i][k][:-1]) for k in ks] for i, ks in enumerate(multi)]
    rounds = plan_rounds(prompts, branches, layout, cells)
    n_vocab = llm.n_vocab()
    batch = SeqBatch(layout.n_batch, layout.n_seq_max)
    try:
        for members in rounds:
            clear_memory(llm)
            logits = {}
            lps = {i: [np.empty(len(c)) for c in conts[i]] for i in members}
            for piece in cut_decodes(round_tokens(prompts, branches, members), layout.n_batch, layout.n_seq_max):
                batch.fill(piece)
                decode(llm, batch)
                for k, t in enumerate(piece):
                    if t.out is None:
                        continue
                    # read now: the next decode overwrites the row
                    row = np.ctypeslib.as_array(C.llama_get_logits_ith(llm.ctx, k), shape=(n_vocab,))
                    if t.out[0] == "prompt":
                        i = t.out[1]
                        logits[i] = row.copy()
                        if conts[i]:
                            first = log_softmax(row)
                            for lp, cont in zip(lps[i], conts[i]):
                                if len(cont):
                                    lp[0] = first[cont[0]]
                    else:  # branch c of prompt i, its token j: the log-probability of token j + 1
                        _, i, c, j = t.out
                        cont = conts[i][multi[i][c]]
                        lps[i][multi[i][c]][j + 1] = log_softmax(row)[cont[j + 1]]
            for i in members:
                yield i, logits.pop(i), lps.pop(i)
    finally:
        batch.close()
        clear_memory(llm)


def generate_rounds(llm, layout: EvalLayout, prompts, max_tokens: int, cells: int,
                    stop: tuple[str, ...] = ()) -> list[str]:
    """Greedy completions of prompts, as parallel sequences: a round's prompts decode together
    (their shared prefix once), then every unfinished sequence adds its next token (the argmax of
    its logits, the first on a tie) to one decode per step.  A sequence leaves the batch at its
    end-of-generation token, its first stop string, or max_tokens.  The text is what
    llama-cpp-python's create_completion returns for the same tokens (detokenized after the
    prompt, invalid UTF-8 dropped); a stop string and what follows it are cut."""
    C = _C()
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()
    none = [[] for _ in prompts]  # no branches
    rounds = plan_rounds(prompts, none, layout, cells, extra=max(0, max_tokens - 1))  # room for each completion
    texts: list[str] = [""] * len(prompts)
    batch = SeqBatch(max(layout.n_batch, layout.sequences), layout.n_seq_max)
    try:
        for members in rounds:
            clear_memory(llm)
            seq = {i: k for k, i in enumerate(members)}
            nxt: dict[int, int] = {}
            toks = round_tokens(prompts, none, members)
            for piece in cut_decodes(toks, layout.n_batch, layout.n_seq_max):
                batch.fill(piece)
                decode(llm, batch)
                for k, t in enumerate(piece):
                    if t.out is not None:
                        row = np.ctypeslib.as_array(C.llama_get_logits_ith(llm.ctx, k), shape=(n_vocab,))
                        nxt[t.out[1]] = int(np.argmax(row))
            done = {i: [] for i in members}
            active = list(members)
            while active:
                still = []
                for i in active:
                    tok = nxt.pop(i)
                    if C.llama_vocab_is_eog(vocab, tok):
                        continue
                    done[i].append(tok)
                    if len(done[i]) >= max_tokens or (stop and _stopped(llm, prompts[i], done[i], stop)):
                        continue
                    still.append(i)
                active = still
                if not active:
                    break
                batch.fill_simple([done[i][-1] for i in active],
                                  [len(prompts[i]) + len(done[i]) - 1 for i in active], [seq[i] for i in active])
                decode(llm, batch)
                for k, i in enumerate(active):
                    row = np.ctypeslib.as_array(C.llama_get_logits_ith(llm.ctx, k), shape=(n_vocab,))
                    nxt[i] = int(np.argmax(row))
            for i in members:
                text = llm.detokenize(done[i], prev_tokens=prompts[i]).decode("utf-8", errors="ignore")
                for s in stop:
                    if s in text:
                        text = text[:text.index(s)]
                texts[i] = text
    finally:
        batch.close()
        clear_memory(llm)
    return texts


def _stopped(llm, prompt, tokens, stop) -> bool:
    text = llm.detokenize(tokens, prev_tokens=prompt).decode("utf-8", errors="ignore")
    return any(s in text for s in stop)
