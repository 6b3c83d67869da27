"""Sync frames: what the decoder delivers is exactly what was sent, whatever happens to the bytes
on the way; a damaged frame is dropped (counted), never delivered, never fatal, and does not take
an intact neighbour with it (the one exception: damage that left the frame itself whole by
borrowing its neighbour's first byte, and then that frame is delivered exactly as sent)."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest

from qes_edge.sync.frames import HEADER_SIZE, MAGIC, MAX_PAYLOAD, OVERHEAD, Decoder, Frame, FrameError, encode
from qes_edge.sync.testing import check_fuzz, fuzz_decoder


def frames_of(rng, n, max_len=700):
    out = []
    for i in range(n):
        payload = rng.bytes(int(rng.integers(0, max_len)))
        if rng.random() < 0.2:  # payloads that hold the magic: resynchronisation must not trust it
            payload = payload[:10] + MAGIC + payload[10:]
        out.append(Frame(int(rng.integers(1, 10)), 7, i, payload))
    return out


def enc(f: Frame) -> bytes:
    return encode(f.type, f.payload, f.session, f.seq)


def feed_chunked(dec: Decoder, data: bytes, rng) -> list[Frame]:
    out, i = [], 0
    while i < len(data):
        n = int(rng.integers(1, 2000))
        out += dec.feed(data[i:i + n])
        i += n
    return out


def test_round_trip_in_any_chunking():
    rng = np.random.default_rng(0)
    sent = frames_of(rng, 300)
    data = b"".join(enc(f) for f in sent)
    assert len(data) == sum(f.size for f in sent)
    for chunking in (1, 3, 24, 1000, len(data)):
        dec = Decoder()
        got = []
        for i in range(0, len(data), chunking):
            got += dec.feed(data[i:i + chunking])
        assert got == sent and dec.pending == 0 and dec.errors == 0


def test_layout_is_the_documented_one():
    raw = encode(6, b"abc", 0x01020304, 5)
    assert raw[:4] == MAGIC and raw[4] == 1 and raw[5] == 6 and raw[6] == 0 and raw[7] == 0
    assert struct.unpack_from("<III", raw, 8) == (0x01020304, 5, 3)
    assert struct.unpack_from("<I", raw, 20)[0] == zlib.crc32(raw[:20])
    assert raw[24:27] == b"abc" and struct.unpack_from("<I", raw, 27)[0] == zlib.crc32(raw[:27])
    assert len(raw) == OVERHEAD + 3 == HEADER_SIZE + 3 + 4


def test_limits():
    with pytest.raises(FrameError, match="does not fit"):
        encode(1, b"x" * (MAX_PAYLOAD + 1), 0, 0)
    with pytest.raises(FrameError):
        encode(300, b"", 0, 0)
    assert Decoder().feed(encode(1, b"x" * MAX_PAYLOAD, 0, 0))[0].payload == b"x" * MAX_PAYLOAD


def test_garbage_between_frames_is_skipped():
    rng = np.random.default_rng(1)
    sent = frames_of(rng, 50)
    data = b"".join(rng.bytes(int(rng.integers(0, 50))) + enc(f) for f in sent) + b"QE"
    dec = Decoder()
    assert feed_chunked(dec, data, rng) == sent
    assert dec.stats["garbage"] > 0 and dec.pending <= 3


def test_a_flipped_length_bit_is_caught_by_the_header_crc():
    """Without a header CRC, a length grown by a flipped bit would make the decoder swallow the
    frames behind it (or wait for a megabyte); with it, the next frame comes out at once."""
    a, b = encode(1, b"first", 1, 0), encode(1, b"second", 1, 1)
    bad = bytearray(a)
    bad[16 + 2] ^= 0x08  # bit 19 of the length: 5 -> 524293
    dec = Decoder()
    got = dec.feed(bytes(bad) + b)
    assert [f.payload for f in got] == [b"second"]
    assert dec.stats["bad_header"] == 1 and dec.pending == 0


def test_a_frame_cut_short_does_not_take_the_next_one():
    a, b = encode(1, b"A" * 100, 1, 0), encode(1, b"B" * 100, 1, 1)
    dec = Decoder()
    got = dec.feed(a[:60] + b)  # the rest of a never came
    assert [f.payload for f in got] == [b"B" * 100] and dec.stats["bad_crc"] == 1


def test_a_stalled_partial_frame_is_given_up():
    a = encode(1, b"A" * 100, 1, 0)
    dec = Decoder()
    assert dec.feed(a[:70]) == [] and dec.pending == 70
    assert dec.give_up_partial() == [] and dec.stats["stalled"] == 1 and dec.pending < 4


def test_oversize_length_with_a_good_header_crc_is_refused():
    import struct as s
    head = s.pack("<4sBBBBIII", MAGIC, 1, 1, 0, 0, 1, 0, MAX_PAYLOAD + 1)
    head += s.pack("<I", zlib.crc32(head))
    dec = Decoder()
    assert dec.feed(head + encode(1, b"ok", 1, 1))[0].payload == b"ok"
    assert dec.stats["too_long"] == 1


def test_another_frame_version_is_named():
    import struct as s
    head = s.pack("<4sBBBBIII", MAGIC, 2, 1, 0, 0, 1, 0, 3)
    head += s.pack("<I", zlib.crc32(head))
    dec = Decoder()
    assert dec.feed(head + b"abc" + b"\0" * 4) == []
    assert dec.versions_seen == {2} and dec.stats["other_version"] == 1


def test_fuzz_ten_thousand_corrupted_frames():
    """Each damaged frame (9 kinds of damage) followed by an intact one: no damaged frame comes
    out, every intact one does, in order (see fuzz_decoder for the one way an intact frame can be
    lost: its predecessor's damage left that frame whole)."""
    t = time.perf_counter()
    out = fuzz_decoder(10_000, seed=2024)
    check_fuzz(out)
    assert sum(out["kinds"].values()) == 10_000 and len(out["kinds"]) == 9
    assert out["delivered"] >= 10_000 and out["intact_lost"] == 0
    assert time.perf_counter() - t < 60


def test_a_damaged_frame_left_whole_is_delivered_as_sent():
    """The damage can fall outside a frame: its last byte dropped when the next frame's first
    byte equals it.  The frame is then whole and delivered exactly as sent; the next frame lost
    its magic and is dropped.  Nothing damaged is ever delivered."""
    a = encode(1, b"payload", 1, 0)
    b = bytearray(encode(1, b"second", 1, 1))
    b[0] = a[-1]  # the next frame's first byte happens to equal the dropped one
    dec = Decoder()
    got = dec.feed(a[:-1] + bytes(b))
    assert got == [Frame(1, 1, 0, b"payload")]
