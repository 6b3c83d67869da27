"""llama.cpp through llama-cpp-python, loaded the way qes-edge needs it.

DESIGN.md, "Where the weights live": with use_mmap=False and llama.cpp's extra buffer types
off (no CPU_REPACK / AMX copies), every weight sits in one ordinary writable CPU buffer, so the
tensor the forward pass reads is the one libqes edits in place.  `Llama(...)` does not expose
use_extra_bufts, so the model parameters it asks llama.cpp for are adjusted while it loads.

The evaluation helpers clear the context's memory first: a cached prompt prefix would hide a
change of the weights."""

from __future__ import annotations

import contextlib
import ctypes
import time
from pathlib import Path

import numpy as np


def _llama_cpp():
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as C
    except ImportError as e:
        raise RuntimeError("llama-cpp-python is not installed: run scripts/install.sh (it builds it with "
                           "the flags that work on every x86-64 CPU)") from e
    return llama_cpp, C


@contextlib.contextmanager
def _no_extra_buffers(C):
    orig = C.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = orig


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    After the throwaway context that finds the weights, whose freed buffers the allocator would
    otherwise keep beside the real context's: 1.2 MB less resident for the rest of the run."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _before_context(C, hook):
    """While Llama(...) loads: hook(model) runs on the loaded llama_model pointer once, just before
    llama-cpp-python creates its context (llama_init_from_model) from it."""
    orig = C.llama_init_from_model

    def init(model, params):
        C.llama_init_from_model = orig
        hook(model)
        release_freed_heap()
        return orig(model, params)

    C.llama_init_from_model = init
    try:
        yield
    finally:
        C.llama_init_from_model = orig


def load_llama(path: str | Path, n_ctx: int = 512, n_threads: int | None = None, verbose: bool = False,
               before_context=None, n_gpu_layers: int = 0):
    """n_threads (None or 0: threads.default_threads()) is used for generation and for prompt
    processing alike: llama-cpp-python leaves n_threads_batch at every core otherwise.

    before_context(model, n_threads): called with the loaded llama_model pointer before the
    context is created (ModelDriver finds the weights there: llama_weights.capture_model_weights),
    so that whatever it allocates and frees is not held beside the context's buffers.

    n_gpu_layers: layers offloaded to the GPU (-1: all; 0: none); extra buffer types stay off,
    so an offloaded weight is one plain device buffer that libqes's device backend edits."""
    from qes_edge.threads import resolve_threads, set_wait_policy
    set_wait_policy()  # before llama.cpp's OpenMP runtime is loaded (a no-op once qes_edge is imported)
    llama_cpp, C = _llama_cpp()
    n = resolve_threads(n_threads)
    hook = (lambda model: before_context(model, n)) if before_context is not None else None
    with _no_extra_buffers(C), (_before_context(C, hook) if hook else contextlib.nullcontext()):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n, n_threads_batch=n,
                               use_mmap=False, verbose=verbose, n_gpu_layers=int(n_gpu_layers))


def clear(llm) -> None:
    """Empty the context: no cached prefix survives (llama_memory_clear)."""
    llm.reset()
    llm._ctx.kv_cache_clear()


def forward(llm, tokens) -> None:
    """One full forward pass of tokens from an empty context."""
    clear(llm)
    llm.eval(tokens)


def last_logits(llm) -> np.ndarray:
    """Logits of the last evaluated position (a copy)."""
    _, C = _llama_cpp()
    ptr = C.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


#: the most tokens one batched decode asks logits for: llama.cpp's output buffer grows to
#: rows x n_vocab floats (49152 x 4 bytes = 192 KiB a row for SmolLM2) and keeps that size, so a
#: long continuation is decoded in chunks of this many rows (6 MiB), inside the memory contract
MAX_LOGIT_ROWS = 32


def decode_rows(llm, n_past: int, seq, on_row) -> None:
    """Decode seq at positions n_past.. on top of the context's first n_past tokens, in batches
    that ask llama.cpp for logits at every position, and call on_row(j, logits after seq[:j+1])
    for every j (a view, valid only during the call).  Then the KV cache is rolled back to n_past
    and the Llama object's n_tokens set to n_past (its input_ids[:n_past] untouched), so the two
    stay consistent and the next call may start from the same place.

    Unlike Llama(logits_all=True), which holds n_ctx x n_vocab floats for the whole context, this
    keeps logits for just these positions: seq is decoded in near-equal chunks of at most
    MAX_LOGIT_ROWS tokens, never a chunk of one token when seq has more (llama.cpp computes a
    one-token batch on another path, whose last bits differ from a several-token batch's)."""
    _, C = _llama_cpp()
    seq = [int(t) for t in seq]
    if not seq:
        return
    if n_past < 0 or n_past > llm.n_tokens or n_past + len(seq) > llm.n_ctx():
        raise ValueError(f"{len(seq)} tokens after {n_past} do not fit (context: {llm.n_tokens} of {llm.n_ctx()})")
    step = max(2, min(MAX_LOGIT_ROWS, llm.n_batch))
    n_chunks = -(-len(seq) // step)
    bounds = [len(seq) * k // n_chunks for k in range(n_chunks + 1)]
    n_vocab = llm.n_vocab()
    llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
    llm.n_tokens = n_past
    try:
        for a, b in zip(bounds, bounds[1:]):
            llm._batch.set_batch(batch=seq[a:b], n_past=n_past + a, logits_all=True)
            llm._ctx.decode(llm._batch)
            for j in range(b - a):
                ptr = C.llama_get_logits_ith(llm.ctx, j)
                on_row(a + j, np.ctypeslib.as_array(ptr, shape=(n_vocab,)))
    finally:
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)


def time_forward(llm, tokens, repeats: int = 5) -> float:
    """Median seconds of one forward pass over tokens (after one warm-up)."""
    forward(llm, tokens)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(llm, tokens)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
