import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # reference.py, helpers
sys.path.append(str(ROOT))               # models/ (the requantize helper)


from qes_edge.quant import TRAINABLE, type_info  # noqa: E402

TYPE_NAMES = [t.name for t in TRAINABLE]


@pytest.fixture(scope="session")
def default_model():
    from qes_edge.models import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def model_of_type(default_model):
    """Path of a real GGUF holding tensors of the given type (the default model requantized)."""
    cache = {}

    def get(name: str) -> Path:
        if name == "Q4_1":
            return default_model
        if name not in cache:
            from models.requantize import requantize
            cache[name] = requantize(default_model, name)
        return cache[name]

    return get


def random_blocks(qtype, n_blocks: int, rng: np.random.Generator, extreme: float = 0.0):
    """Random bytes for n_blocks blocks of qtype, with a fraction of codes pushed to the range ends.
    Returns (bytes array, n_elements)."""
    from qes_edge.engine import CodeTensor

    info = type_info(qtype)
    data = rng.integers(0, 256, size=n_blocks * info.block_bytes, dtype=np.uint8)
    n = n_blocks * info.block_elems
    if extreme:
        t = CodeTensor("scratch", qtype, n, data)
        codes = t.codes()
        pick = rng.random(n) < extreme
        codes[pick] = np.where(rng.random(pick.sum()) < 0.5, info.cmin, info.cmax)
        t.set_codes(codes)
    return data, n
