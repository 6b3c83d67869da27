"""Bad input to the engine: a QESError naming the tensor and the problem, never a crash."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from qes_edge.native.engine import CodeTensor, sigma_threshold
from qes_edge.native.quant import QESError, type_info


@pytest.mark.parametrize("qtype", [QT.IQ4_NL, QT.IQ2_XXS, QT.IQ3_S, QT.IQ4_XS, QT.TQ1_0, QT.MXFP4])
def test_lattice_and_other_types_are_refused(qtype):
    with pytest.raises(QESError, match=rf"tensor 'blk.4.ffn_down.weight': {qtype.name} has no ordered integer code"):
        CodeTensor("blk.4.ffn_down.weight", qtype, 256, np.zeros(1024, np.uint8))


@pytest.mark.parametrize("qtype", [QT.F16, QT.F32, QT.BF16])
def test_float_tensors_are_not_codes(qtype):
    with pytest.raises(QESError, match=rf"'blk.0.attn_norm.weight': {qtype.name} is a float type"):
        CodeTensor("blk.0.attn_norm.weight", qtype, 576, np.zeros(576 * 4, np.uint8))


def test_unknown_type_id():
    with pytest.raises(QESError, match="type 9999"):
        type_info(9999, "t")


@pytest.mark.parametrize("n, nbytes, what", [
    (64, 39, "64 elements .* in 39 bytes"),      # one byte short
    (64, 41, "64 elements .* in 41 bytes"),      # one byte long
    (48, 30, "48 elements"),                       # not a whole block
])
def test_byte_length_must_match(n, nbytes, what):
    with pytest.raises(QESError, match=rf"tensor 'blk.2.attn_q.weight' \(Q4_1\): {what}.*disagree"):
        CodeTensor("blk.2.attn_q.weight", QT.Q4_1, n, np.zeros(nbytes, np.uint8))


def test_null_buffer():
    with pytest.raises(QESError, match="'w': null buffer"):
        CodeTensor("w", QT.Q4_0, 32, address=0, n_bytes=18)
    with pytest.raises(QESError, match="'w' \\(Q4_0\\).*NULL"):
        CodeTensor("w", QT.Q4_0, 32, np.zeros(0, np.uint8))


def test_codes_out_of_range_write_nothing():
    data = np.zeros(18 * 2, np.uint8)
    t = CodeTensor("w", QT.Q4_0, 64, data)
    with pytest.raises(QESError, match=r"\[0, 15\]"):
        t.set_codes(np.r_[np.zeros(63), 16])
    with pytest.raises(QESError, match="outside"):
        t.codes(60, 10)
    assert not data.any()


def test_sigma_errors_name_the_limit():
    with pytest.raises(QESError, match="<= 0.5"):
        sigma_threshold(0.7)


def test_type_table_matches_gguf():
    from gguf.constants import GGML_QUANT_SIZES

    from qes_edge.native.quant import GGML_TYPES
    assert {int(k): (k.name, *v) for k, v in GGML_QUANT_SIZES.items()} == GGML_TYPES
