"""Find the weight tensors a llama.cpp model computes with, and wrap them as CodeTensors.

llama.h has no tensor-by-name getter.  A throwaway context with an eval callback (cb_eval)
runs one forward pass; the scheduler shows us every graph node, and each node's sources that
live in a WEIGHTS buffer are the model's weights: we record their ggml_tensor pointers.  The
ctypes layout of ggml_tensor below is checked against ggml's own accessors (ggml_get_data,
ggml_get_name) for every tensor, so a layout change in a future ggml is refused, not trusted.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from qes_edge.native.engine import CodeTensor
from qes_edge.native.quant import QESError, is_trainable, type_name

GGML_BUFFER_USAGE_WEIGHTS = 1


class _GGMLTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml_base():
    import llama_cpp
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for fn, res, args in [
        ("ggml_get_name", ctypes.c_void_p, [ctypes.c_void_p]),
        ("ggml_get_data", ctypes.c_void_p, [ctypes.c_void_p]),
        ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
        ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
        ("ggml_backend_buffer_get_usage", ctypes.c_int, [ctypes.c_void_p]),
        ("ggml_backend_buffer_is_host", ctypes.c_bool, [ctypes.c_void_p]),
        ("ggml_backend_buffer_name", ctypes.c_char_p, [ctypes.c_void_p]),
    ]:
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


@dataclass(frozen=True)
class Weight:
    name: str
    ggml_type: int
    n_elements: int
    n_bytes: int
    data: int          # host address of the bytes the forward pass reads
    host: bool
    buffer: str


def capture_weights(llm) -> dict[str, Weight]:
    """Every weight tensor of a loaded Llama, by name, from one forward pass on a throwaway context."""
    return capture_model_weights(llm.model, getattr(llm, "n_threads", None))


def capture_model_weights(model, n_threads: int | None = None) -> dict[str, Weight]:
    """Every weight tensor of a llama.cpp model (a llama_model pointer), by name, from one forward
    pass on a throwaway context (n_threads: its threads; None: llama.cpp's default).

    llama_runtime.load_llama(before_context=...) runs this on the model before llama-cpp-python
    creates its own context, so that the throwaway context's buffers (a 256-cell KV cache, a
    compute buffer: ~8 MB for SmolLM2) are freed before the real ones are allocated, not held
    beside them."""
    from llama_cpp import llama_cpp as C

    g = _ggml_base()
    found: dict[str, Weight] = {}
    problems: list[str] = []

    def on_node(t, ask, _user):
        node = ctypes.cast(t, ctypes.POINTER(_GGMLTensor)).contents
        for src in node.src:
            if not src:
                continue
            s = ctypes.cast(src, ctypes.POINTER(_GGMLTensor)).contents
            if not s.buffer or g.ggml_backend_buffer_get_usage(s.buffer) != GGML_BUFFER_USAGE_WEIGHTS:
                continue
            name = s.name.decode("utf-8", "replace")
            if name in found:
                continue
            if g.ggml_get_data(src) != s.data or ctypes.string_at(g.ggml_get_name(src)) != s.name:
                problems.append(name)
                continue
            found[name] = Weight(name, s.type, int(g.ggml_nelements(src)), int(g.ggml_nbytes(src)), int(s.data or 0),
                                 bool(g.ggml_backend_buffer_is_host(s.buffer)),
                                 g.ggml_backend_buffer_name(s.buffer).decode())
        return False  # only looking: never split the graph

    callback = C.ggml_backend_sched_eval_callback(on_node)
    params = C.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 16, 16, 16
    if n_threads:  # the threads the real context uses: no extra OpenMP workers left idle
        params.n_threads = params.n_threads_batch = int(n_threads)
    params.cb_eval, params.cb_eval_user_data = callback, None
    # the tokens of b"qes" with BOS, as Llama.tokenize(b"qes", add_bos=True) gives them
    text = b"qes"
    buf = (C.llama_token * 16)()
    n = C.llama_tokenize(C.llama_model_get_vocab(model), text, len(text), buf, 16, True, False)
    tokens = list(buf[:max(0, n)])[:2] or [0]
    ctx = C.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context to find the weights")
    try:
        arr = (C.llama_token * len(tokens))(*tokens)
        rc = C.llama_decode(ctx, C.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) while finding the weights")
    finally:
        C.llama_free(ctx)
    if problems:
        raise RuntimeError("this llama.cpp build's ggml_tensor layout differs from the one qes-edge knows "
                           f"(checked on {problems[0]!r}); refusing to edit weights through it")
    return found


def weight_code_tensors(weights: dict[str, Weight], names: list[str], device_of=None) -> list[CodeTensor]:
    """CodeTensors over the live llama.cpp buffers of the named weights, each where it lives:
    host memory, or the device memory llama.cpp offloaded it to (placement.device_of decides;
    device_of(weight) -> a device backend name or None may replace it)."""
    from qes_edge.llama.placement import device_of as placement_of
    device_of = device_of or placement_of
    out = []
    for name in names:
        w = weights.get(name)
        if w is None:
            raise QESError(f"tensor {name!r} is in the file but the forward pass never reads it")
        if not is_trainable(w.ggml_type):
            raise QESError(f"tensor {name!r}: {type_name(w.ggml_type)} has no ordered integer code")
        out.append(CodeTensor(name, w.ggml_type, w.n_elements, address=w.data, n_bytes=w.n_bytes, keepalive=w,
                              device=device_of(w)))
    return out
