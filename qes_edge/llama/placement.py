"""Where each weight lives when llama.cpp offloads layers to a GPU (`--gpu-layers N|all`), and
which libqes backend edits it there.

llama.cpp puts an offloaded layer's weights in a device buffer ("CUDA0", "CUDA1", ...) and
keeps the rest (the token embeddings always, the layers past N) in ordinary host buffers.  The
weight capture (weights.py) records each weight's buffer; here a buffer becomes a placement:
None for host memory (the host backend edits it, as without offload), or the device backend
whose memory holds it ("cuda").  A step then perturbs, restores and updates each tensor where it
is (engine.TensorGroup splits the calls by memory), and the weights digest reads device bytes
where they are: no host copy of a device weight is made.

The bits of the ledger do not depend on placement (the engine is integer and every backend
writes the same bytes); the rewards do, in their last bits: a GPU's matrix products round
differently from the CPU's, as two thread counts do.  So the placement is part of what a
`--peers` worker must share with its coordinator."""

from __future__ import annotations

import re

#: llama.cpp's device buffer names, by the libqes device backend that edits their memory
_DEVICE_BUFFERS = (
    (re.compile(r"^CUDA\d+$"), "cuda"),
    (re.compile(r"^(Metal|MTL\d*)$"), "metal"),
)

ALL_LAYERS = -1  # llama-cpp-python's n_gpu_layers for "every layer"


class GpuOffloadUnavailable(RuntimeError):
    """--gpu-layers asked of a llama.cpp (or libqes) that cannot offload here."""


def parse_gpu_layers(value) -> int:
    """`--gpu-layers`: "all" (-1: every layer), or a count of layers >= 0 (0: none, the default)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip().lower()
        if text == "all":
            return ALL_LAYERS
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"--gpu-layers takes a number of layers or 'all', got {value!r}") from None
    if n < ALL_LAYERS:
        raise ValueError(f"--gpu-layers takes a number of layers >= 0 or 'all', got {value!r}")
    return n


def describe_gpu_layers(n: int) -> str:
    return "all" if n == ALL_LAYERS else str(n)


def offload_supported() -> bool:
    """This llama.cpp build can put layers on a GPU (a CUDA or Metal build, with a device found)."""
    from llama_cpp import llama_cpp as C
    return bool(C.llama_supports_gpu_offload())


def check_offload(gpu_layers: int) -> None:
    """Refuse --gpu-layers where it cannot work, in one line (the CLI exits 2 on it)."""
    if gpu_layers == 0:
        return
    if not offload_supported():
        raise GpuOffloadUnavailable(
            f"--gpu-layers {describe_gpu_layers(gpu_layers)}: this llama.cpp was built for the CPU only (or finds "
            "no GPU): reinstall with QES_EDGE_GPU=cuda bash scripts/install.sh on a machine with nvcc and an "
            "NVIDIA GPU, or leave --gpu-layers out")


def device_of(weight) -> str | None:
    """The libqes device backend whose memory holds weight (a weights.Weight), or None for host
    memory.  A device buffer of a kind libqes has no backend for is refused (QESError)."""
    from qes_edge.native.quant import QESError
    if weight.host:
        return None
    for pattern, backend in _DEVICE_BUFFERS:
        if pattern.match(weight.buffer):
            return backend
    raise QESError(f"tensor {weight.name!r} lives in a {weight.buffer} buffer: libqes has no backend that edits "
                   "that memory (CUDA and Metal buffers only); load it with fewer --gpu-layers")


def layer_of(name: str) -> int | None:
    """The repeating layer a tensor belongs to ("blk.7.attn_q.weight" -> 7); None for the others."""
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def first_gpu_layer(n_layer: int, gpu_layers: int) -> int:
    """The first layer llama.cpp offloads for --gpu-layers (n_layer: none)."""
    n = (1 << 31) - 1 if gpu_layers == ALL_LAYERS else gpu_layers
    return max(n_layer - n, 0)


def planned_on_gpu(name: str, n_layer: int, gpu_layers: int) -> bool:
    """Whether llama.cpp puts tensor `name` on the GPU for --gpu-layers (its rule, in
    llama-model.cpp's load_tensors): the last gpu_layers layers; the output head too once every
    layer is (gpu_layers > n_layer); the token embeddings never (they are looked up on the CPU)."""
    layer = layer_of(name)
    if layer is not None:
        return layer >= first_gpu_layer(n_layer, gpu_layers)
    if name.startswith("output.") or name.startswith("output_norm."):
        return gpu_layers == ALL_LAYERS or gpu_layers > n_layer
    return False


def block_count(metadata: dict) -> int | None:
    from qes_edge.gguf.check import arch_value
    v = arch_value(metadata, "block_count")
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def summary(tensors) -> str:
    """'30 in host memory, 180 in cuda memory': where a model's trainable tensors live."""
    count: dict[str, int] = {}
    for t in tensors:
        where = getattr(t, "resident", None) or "host"
        count[where] = count.get(where, 0) + 1
    return ", ".join(f"{n} in {w} memory" for w, n in sorted(count.items(), key=lambda kv: kv[0] != "host"))
