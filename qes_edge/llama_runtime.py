"""llama.cpp through llama-cpp-python, loaded the way qes-edge needs it.

use_mmap=False: weights live in an ordinary writable CPU buffer (DESIGN.md: with mmap they sit
in llama.cpp's read-only file mapping).  The evaluation helpers clear the context's memory
first, because a cached prompt prefix would hide a change of the weights."""

from __future__ import annotations

import os
import time
from pathlib import Path


def load_llama(path: str | Path, n_ctx: int = 512, n_threads: int | None = None, verbose: bool = False):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise RuntimeError("llama-cpp-python is not installed: run scripts/install.sh (it builds it with "
                           "the flags that work on every x86-64 CPU)") from e
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count() or 1,
                 use_mmap=False, verbose=verbose)


def forward(llm, tokens) -> None:
    """One full forward pass of tokens from an empty context."""
    llm.reset()
    llm._ctx.kv_cache_clear()  # llama_memory_clear: no cached prefix survives
    llm.eval(tokens)


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
