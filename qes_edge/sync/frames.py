"""Frames: the byte layer of ledger sync (docs/sync-protocol.md §2).

A frame is a 24-byte header, a payload of at most MAX_PAYLOAD bytes and a CRC-32 over header
and payload.  The header carries its own CRC-32, so a length is never trusted before the bytes
that state it are known to be intact: a flipped bit in a length field would otherwise make the
decoder wait for (or skip over) megabytes that are not a frame.

    offset  size  field
    0       4     magic  b"QES\\xa7"
    4       1     frame version (1)
    5       1     message type
    6       1     flags (0: none defined in version 1)
    7       1     reserved (0)
    8       4     session id, u32 LE
    12      4     sequence number, u32 LE
    16      4     payload length, u32 LE (<= MAX_PAYLOAD)
    20      4     CRC-32 of bytes 0..19, u32 LE
    24      n     payload
    24+n    4     CRC-32 of bytes 0..24+n-1 (header and payload), u32 LE

The streaming :class:`Decoder` takes bytes as they come (any chunking), skips garbage up to the
next magic, and on any check that fails (header CRC, version, flags, length, frame CRC) drops
only the first byte of what looked like a frame and scans on: a frame that follows a damaged one
is never lost with it.  Nothing it is fed raises; what it dropped is counted in `stats`.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass

MAGIC = b"QES\xa7"
FRAME_VERSION = 1
MAX_PAYLOAD = 1 << 20  # 1 MiB
_HEAD = struct.Struct("<4sBBBBIII")  # magic, version, type, flags, reserved, session, seq, length
HEADER_SIZE = _HEAD.size + 4  # 24: the fields and their CRC
OVERHEAD = HEADER_SIZE + 4  # 28 bytes per frame
_U32 = struct.Struct("<I")


class FrameError(ValueError):
    """A frame that cannot be made (a payload too large, a field out of range)."""


@dataclass(frozen=True)
class Frame:
    type: int
    session: int
    seq: int
    payload: bytes
    flags: int = 0

    @property
    def size(self) -> int:
        return OVERHEAD + len(self.payload)


def encode(ftype: int, payload: bytes, session: int, seq: int, flags: int = 0) -> bytes:
    """The bytes of one frame."""
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"a payload of {len(payload)} bytes does not fit in a frame (at most {MAX_PAYLOAD})")
    if not (0 <= ftype < 256 and 0 <= flags < 256 and 0 <= session < 2**32 and 0 <= seq < 2**32):
        raise FrameError(f"frame field out of range (type {ftype}, flags {flags}, session {session}, seq {seq})")
    head = _HEAD.pack(MAGIC, FRAME_VERSION, ftype, flags, 0, session, seq, len(payload))
    head += _U32.pack(zlib.crc32(head))
    body = head + payload
    return body + _U32.pack(zlib.crc32(body))


class Decoder:
    """Bytes in, intact frames out.  `stats` counts what was dropped and why:

    - `garbage`: bytes skipped that did not start a frame (noise, the rest of a damaged frame)
    - `bad_header`: a magic whose header CRC fails (a damaged header, or a magic by chance)
    - `other_version`: a header of another frame version (`versions_seen` names them)
    - `bad_field`: a header whose CRC holds but whose flags, reserved byte or length are not
      allowed (`too_long` counts lengths over the maximum among them)
    - `bad_crc`: a complete frame whose CRC fails (a damaged payload, dropped or added bytes)
    - `stalled`: a partial frame given up because its rest never came (:meth:`give_up_partial`)
    - `frames`: frames delivered
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload = max_payload
        self.buf = bytearray()
        self.stats: Counter = Counter()
        self.versions_seen: set[int] = set()

    @property
    def pending(self) -> int:
        """Bytes held: the start of a frame not complete yet (or up to 3 bytes of a magic)."""
        return len(self.buf)

    @property
    def errors(self) -> int:
        """Frames (or what looked like them) dropped so far."""
        s = self.stats
        return s["bad_header"] + s["other_version"] + s["bad_field"] + s["bad_crc"] + s["stalled"]

    def feed(self, data: bytes) -> list[Frame]:
        if data:
            self.buf += data
        return self._scan()

    def give_up_partial(self) -> list[Frame]:
        """The link went quiet in the middle of a frame: its rest is lost.  Drop its first byte and
        scan what is held for frames (a damaged length may have made a whole frame look partial)."""
        if len(self.buf) >= len(MAGIC) and self.buf.startswith(MAGIC):
            self.stats["stalled"] += 1
            del self.buf[:1]
            return self._scan()
        return []

    def _skip(self, n: int) -> None:
        self.stats["garbage"] += n
        del self.buf[:n]

    def _scan(self) -> list[Frame]:
        out = []
        buf = self.buf
        while True:
            i = buf.find(MAGIC)
            if i < 0:
                keep = len(MAGIC) - 1  # a magic may straddle two reads
                if len(buf) > keep:
                    tail = bytes(buf[-keep:])
                    j = max((k for k in range(1, keep + 1) if MAGIC.startswith(tail[-k:])), default=0)
                    self._skip(len(buf) - j)
                return out
            if i:
                self._skip(i)
            if len(buf) < HEADER_SIZE:
                return out
            (crc,) = _U32.unpack_from(buf, _HEAD.size)
            _, version, ftype, flags, reserved, session, seq, length = _HEAD.unpack_from(buf, 0)
            if zlib.crc32(buf[:_HEAD.size]) != crc:
                if version != FRAME_VERSION:
                    self.stats["other_version"] += 1
                    self.versions_seen.add(version)
                else:
                    self.stats["bad_header"] += 1
                del buf[:1]
                continue
            if version != FRAME_VERSION:
                self.stats["other_version"] += 1
                self.versions_seen.add(version)
                del buf[:1]
                continue
            if flags or reserved or length > self.max_payload:
                self.stats["bad_field"] += 1
                if length > self.max_payload:
                    self.stats["too_long"] += 1
                del buf[:1]
                continue
            total = HEADER_SIZE + length + 4
            if len(buf) < total:
                return out
            (fcrc,) = _U32.unpack_from(buf, HEADER_SIZE + length)
            if zlib.crc32(buf[:HEADER_SIZE + length]) != fcrc:
                self.stats["bad_crc"] += 1
                del buf[:1]
                continue
            out.append(Frame(ftype, session, seq, bytes(buf[HEADER_SIZE:HEADER_SIZE + length]), flags))
            self.stats["frames"] += 1
            del buf[:total]
