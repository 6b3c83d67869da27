"""Block codecs on real tensors: the default model and llama.cpp requantized copies of it.

For every trainable type: set(get()) keeps every byte; code +1 moves the value that the
`gguf` package dequantizes by exactly one level of the element's block (the level libqes
reports), and moves nothing else."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import TYPE_NAMES
from qes_edge.native.engine import CodeTensor

pytestmark = pytest.mark.slow


def tensors_of_type(path, qtype, limit=3):
    reader = GGUFReader(path, "r")
    found = [t for t in reader.tensors if t.tensor_type == qtype]
    # the first ones and the largest (row widths differ: attention vs FFN)
    picked = found[:limit - 1] + sorted(found, key=lambda t: -int(t.n_elements))[:1]
    return reader, picked


def copy_tensor(reader, t):
    raw = np.array(reader.data[t.data_offset:t.data_offset + t.n_bytes], dtype=np.uint8)
    return CodeTensor(t.name, t.tensor_type, int(t.n_elements), raw)


def deq(ct: CodeTensor, blocks: slice):
    info = ct.info
    raw = ct._array[blocks.start * info.block_bytes:blocks.stop * info.block_bytes]
    return dequantize(raw, ct.qtype).astype(np.float64).reshape(-1)


@pytest.mark.parametrize("name", TYPE_NAMES)
def test_codes_round_trip_every_byte(name, model_of_type):
    qtype = QT[name]
    reader, tensors = tensors_of_type(model_of_type(name), qtype)
    assert tensors, f"the requantized model holds no {name} tensor"
    for t in tensors:
        ct = copy_tensor(reader, t)
        before = ct._array.copy()
        codes = ct.codes()
        assert codes.min() >= ct.info.cmin and codes.max() <= ct.info.cmax
        assert len(np.unique(codes)) > 1, "a real tensor uses more than one code"
        ct.set_codes(codes)
        assert np.array_equal(before, ct._array), f"{t.name}: set(get()) changed bytes"


@pytest.mark.parametrize("name", TYPE_NAMES)
def test_plus_one_moves_one_level(name, model_of_type):
    qtype = QT[name]
    reader, tensors = tensors_of_type(model_of_type(name), qtype)
    rng = np.random.default_rng(7)
    for t in tensors:
        ct = copy_tensor(reader, t)
        info = ct.info
        n_blocks = min(96, ct.n_elements // info.block_elems)
        span = slice(0, n_blocks)
        n = n_blocks * info.block_elems
        v0 = deq(ct, span)
        codes = ct.codes(0, n)
        levels = ct.levels(0, n).astype(np.float64)
        # move a random quarter of the elements by +1 (or -1 at the top of the range)
        moved = rng.random(n) < 0.25
        step = np.where(codes < info.cmax, 1, -1)
        new = codes + np.where(moved, step, 0)
        ct.set_codes(new, 0)
        v1 = deq(ct, span)
        diff = v1 - v0
        scale = np.maximum(np.abs(v0), np.abs(v1)) + np.abs(levels)
        tol = 8 * np.finfo(np.float32).eps * scale + 1e-30
        expected = np.where(moved, step * levels, 0.0)
        bad = np.abs(diff - expected) > tol
        assert not bad.any(), (f"{t.name} ({name}): {bad.sum()} elements moved by something other "
                               f"than one level; first at {np.argmax(bad)}: {diff[bad][:3]} vs {expected[bad][:3]}")
        assert np.count_nonzero(levels[moved]) > 0.5 * moved.sum(), "levels are mostly zero"
        # the untouched elements did not move at all
        assert np.array_equal(v1[~moved], v0[~moved])


def test_legacy_levels_are_block_scales(model_of_type):
    """For the legacy types the level is the block's f16 scale d, read here by NumPy alone."""
    for name in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]:
        qtype = QT[name]
        reader, tensors = tensors_of_type(model_of_type(name), qtype, limit=1)
        ct = copy_tensor(reader, tensors[0])
        bb = ct.info.block_bytes
        d = ct._array.reshape(-1, bb)[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
        assert np.array_equal(np.repeat(d, 32), ct.levels()), name
