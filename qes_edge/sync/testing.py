"""Test tooling for sync: synthetic ledgers, pairs of connected links, and a link that damages
what it carries, on purpose and reproducibly (seeded), for the tests and the benchmark's fuzz.

:class:`FaultyLink` acts on what this side writes; one write is one frame in the sync
protocol, so frame-level faults (drop, duplicate, reorder, truncate) act on whole frames and
byte-level faults (drop, flip, garbage) on the bytes inside them.  Wrap both ends for faults in
both directions."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np

from qes_edge.sync.defaults import DEFAULT_BAUD
from qes_edge.sync.frames import HEADER_SIZE, Decoder, Frame, encode
from qes_edge.sync.link import FdLink, Link, LinkClosed, SocketLink

REAL_TIMINGS = {"changed": 47549, "digest_s": 0.346605, "eval_s": 50.872957, "perturb_s": 0.241477,
                "restore_s": 0.220108, "rss_mb": 181.3, "update_s": 0.189045}  # a real step's (SmolLM2, P 16)


def synthetic_ledger(path: str | Path, n_steps: int, population: int = 16, seed: int = 0,
                     base_sha256: str = "ab" * 32, base_name: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
                     noise_spec: int = 1, config: dict | None = None, timings: dict | None = None) -> str:
    """A ledger of one run with n_steps steps shaped like real ones (mirrored seeds, Q16
    coefficients, rewards, a real step's timings): the model is never needed.  Returns the run id."""
    from qes_edge.ledger.store import Ledger
    lg = Ledger(path)
    try:
        run = lg.create_run(base_sha256, base_name, config or {"population": population, "seed": seed}, noise_spec)
        extend(lg, run.run_id, n_steps, seed, population, timings)
        return run.run_id
    finally:
        lg.close()


def extend(lg, run_id: str, n_steps: int, seed: int = 0, population: int = 16, timings: dict | None = None) -> None:
    """Append n_steps synthetic steps to a run (a different seed gives a different branch)."""
    from qes_edge.ledger.store import StepRecord
    rng = np.random.default_rng([seed, lg.head(run_id)[0]])
    start = lg.head(run_id)[0]
    for i in range(start, start + n_steps):
        base = rng.integers(1, 2**31 - 1, population // 2)
        lg.append_step(run_id, StepRecord(
            i, 34268880, np.stack([base, -base], 1).reshape(-1),
            rng.integers(-3 * 65536, 3 * 65536, population).astype(np.int32), rng.random(population),
            rng.bytes(32).hex(), dict(timings or REAL_TIMINGS)))


def socket_pair() -> tuple[Link, Link]:
    a, b = socket.socketpair()
    return SocketLink(a, "socketpair:a"), SocketLink(b, "socketpair:b")


def pty_pair(baudrate: int = DEFAULT_BAUD) -> tuple[Link, Link]:
    """A pseudo-terminal: (the slave opened with pyserial, as a serial device is; the master)."""
    import serial

    from qes_edge.sync.link import SerialLink
    master, slave = os.openpty()
    name = os.ttyname(slave)
    ser = serial.Serial(name, baudrate=baudrate, timeout=0)
    os.close(slave)  # pyserial holds its own descriptor
    return SerialLink(ser, name), FdLink(master, f"{name} (master)")


def corrupt(raw: bytes, rng) -> tuple[bytes, str]:
    """One random corruption that changes the frame's bytes (never leaves it intact with garbage
    before or after it): (damaged bytes, the kind of damage)."""
    b = bytearray(raw)
    kind = ["flip", "flip_header", "flip_length", "drop", "insert", "truncate", "swap", "zero_run", "burst"][
        int(rng.integers(0, 9))]
    if kind == "flip":
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "flip_header":
        i = int(rng.integers(0, HEADER_SIZE))
        b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "flip_length":
        b[16 + int(rng.integers(0, 4))] ^= 1 << int(rng.integers(0, 8))
    elif kind == "drop":
        del b[int(rng.integers(0, len(b)))]
    elif kind == "insert":
        b.insert(int(rng.integers(1, len(b))), int(rng.integers(0, 256)))  # inside: before or after is garbage
    elif kind == "truncate":
        b = b[:int(rng.integers(0, len(b)))]
    elif kind == "swap":
        i = int(rng.integers(0, len(b) - 1))
        if b[i] == b[i + 1]:
            b[i] ^= 0xFF
        else:
            b[i], b[i + 1] = b[i + 1], b[i]
    elif kind == "zero_run":
        i = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 16))
        if all(x == 0 for x in b[i:i + n]):
            b[i] = 1
        else:
            b[i:i + n] = bytes(len(b[i:i + n]))
    else:
        i = int(rng.integers(0, len(b)))
        burst = rng.bytes(int(rng.integers(1, 32)))
        b[i:i + len(burst)] = burst
    if bytes(b) == raw:  # the random change happened to change nothing
        b[0] ^= 1
    return bytes(b), kind


def fuzz_decoder(n_corrupted: int, seed: int = 0, batch: int = 200) -> dict:
    """n_corrupted damaged frames, each followed by an intact one, through one decoder in random
    chunks.  Counts what matters:

    - `wrong`: frames delivered that differ from the frame sent with that sequence number (a
      damaged frame let through): must be 0;
    - `out_of_order`, `repeated`: must be 0;
    - `intact_lost`: intact frames not delivered.  One can be lost only when the damage to the
      frame before it happened to leave that frame whole, borrowing the intact frame's first byte
      (its last byte dropped, and the next byte equal to it): then the damaged frame is delivered
      exactly as sent instead, so `intact_lost` <= `damaged_but_whole`;
    - `damaged_but_whole`: damaged frames delivered exactly as sent (the damage fell outside
      the frame: a byte inserted before its last one and equal to it, a burst past its end)."""
    rng = np.random.default_rng(seed)
    dec = Decoder()
    sent: dict[int, Frame] = {}
    kinds: dict[str, int] = {}
    delivered: list[Frame] = []
    parts: list[bytes] = []

    def feed(data: bytes) -> None:
        i = 0
        while i < len(data):
            k = int(rng.integers(1, 4096))
            delivered.extend(dec.feed(data[i:i + k]))
            i += k

    t0 = time.perf_counter()
    for i in range(n_corrupted):
        bad = Frame(6, 9, 2 * i, rng.bytes(int(rng.integers(0, 600))))
        good = Frame(6, 9, 2 * i + 1, rng.bytes(int(rng.integers(0, 600))))
        sent[bad.seq], sent[good.seq] = bad, good
        damaged, kind = corrupt(encode(bad.type, bad.payload, bad.session, bad.seq), rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        parts.append(damaged + encode(good.type, good.payload, good.session, good.seq))
        if len(parts) == batch:
            feed(b"".join(parts))
            parts = []
    feed(b"".join(parts))
    delivered.extend(dec.give_up_partial())
    seqs = [f.seq for f in delivered]
    good_seen = {s for s in seqs if s % 2}
    return {"corrupted_frames": n_corrupted, "intact_frames": n_corrupted, "kinds": kinds,
            "delivered": len(delivered), "wrong": sum(f != sent.get(f.seq) for f in delivered),
            "out_of_order": sum(a >= b for a, b in zip(seqs, seqs[1:])), "repeated": len(seqs) - len(set(seqs)),
            "intact_lost": n_corrupted - len(good_seen), "damaged_but_whole": sum(1 for s in seqs if s % 2 == 0),
            "seconds": round(time.perf_counter() - t0, 2), "decoder": dict(dec.stats)}


def check_fuzz(out: dict) -> None:
    assert out["wrong"] == 0, f"{out['wrong']} damaged frames were delivered"
    assert out["out_of_order"] == 0 and out["repeated"] == 0, out
    assert out["intact_lost"] <= out["damaged_but_whole"], out


class FaultyLink(Link):
    def __init__(self, inner: Link, seed: int = 0, *, drop_byte: float = 0.0, flip: float = 0.0,
                 garbage: float = 0.0, drop_frame: float = 0.0, dup_frame: float = 0.0, reorder: float = 0.0,
                 truncate: float = 0.0, delay: float = 0.0, chunk: int = 0, chunk_delay: float = 0.0,
                 disconnect_after: int | None = None, skip_frames: int = 0):
        """Probabilities per byte (drop_byte, flip: one random bit, garbage: a random byte inserted
        before it) or per frame (drop_frame, dup_frame, reorder: held back and sent after the next
        one, truncate: only a random prefix sent); delay: seconds before each write; chunk and
        chunk_delay: write in pieces of that many bytes with a pause between (a slow peer);
        disconnect_after: close the link once that many bytes went out (mid-frame, as a cable
        pulled out); skip_frames: the first frames go through untouched."""
        self.inner, self.name = inner, getattr(inner, "name", "faulty")
        self.rng = np.random.default_rng(seed)
        self.p = dict(drop_byte=drop_byte, flip=flip, garbage=garbage, drop_frame=drop_frame, dup_frame=dup_frame,
                      reorder=reorder, truncate=truncate)
        self.delay, self.chunk, self.chunk_delay = delay, chunk, chunk_delay
        self.disconnect_after, self.skip_frames = disconnect_after, skip_frames
        self.written = 0
        self.frames = 0
        self.counts: Counter = Counter()
        self._held: bytes | None = None
        self._closed = False

    def read(self, timeout: float) -> bytes:
        if self._closed:
            raise LinkClosed(f"{self.name}: disconnected (fault)")
        return self.inner.read(timeout)

    def _damage(self, data: bytes) -> bytes:
        p, rng = self.p, self.rng
        if p["truncate"] and rng.random() < p["truncate"]:
            self.counts["truncated"] += 1
            data = data[:int(rng.integers(0, len(data)))]
        if not (p["drop_byte"] or p["flip"] or p["garbage"]) or not data:
            return data
        a = np.frombuffer(data, np.uint8).copy()
        if p["flip"]:
            hit = np.nonzero(rng.random(len(a)) < p["flip"])[0]
            a[hit] ^= (1 << rng.integers(0, 8, len(hit))).astype(np.uint8)
            self.counts["flipped"] += len(hit)
        keep = np.ones(len(a), bool)
        if p["drop_byte"]:
            keep = rng.random(len(a)) >= p["drop_byte"]
            self.counts["dropped_bytes"] += int((~keep).sum())
        out = a[keep]
        if p["garbage"]:
            at = np.nonzero(rng.random(len(out)) < p["garbage"])[0]
            if len(at):
                out = np.insert(out, at, rng.integers(0, 256, len(at)).astype(np.uint8))
                self.counts["garbage"] += len(at)
        return out.tobytes()

    def _send(self, data: bytes) -> None:
        if self.disconnect_after is not None and self.written + len(data) >= self.disconnect_after:
            cut = max(0, self.disconnect_after - self.written)
            if cut:
                self.inner.write(data[:cut])
            self.written += cut
            self.counts["disconnected"] += 1
            self._closed = True
            self.inner.close()
            raise LinkClosed(f"{self.name}: disconnected after {self.written} bytes (fault)")
        if self.chunk:
            for i in range(0, len(data), self.chunk):
                self.inner.write(data[i:i + self.chunk])
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
        else:
            self.inner.write(data)
        self.written += len(data)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise LinkClosed(f"{self.name}: disconnected (fault)")
        self.frames += 1
        if self.delay:
            time.sleep(self.delay)
        if self.frames <= self.skip_frames:
            self._send(data)
            return
        p, rng = self.p, self.rng
        if p["drop_frame"] and rng.random() < p["drop_frame"]:
            self.counts["dropped_frames"] += 1
            return
        data = self._damage(data)
        if p["reorder"] and self._held is None and rng.random() < p["reorder"]:
            self.counts["reordered"] += 1
            self._held = data
            return
        self._send(data)
        if p["dup_frame"] and rng.random() < p["dup_frame"]:
            self.counts["duplicated"] += 1
            self._send(data)
        if self._held is not None:
            held, self._held = self._held, None
            self._send(held)

    def close(self) -> None:
        self._closed = True
        self.inner.close()


class PacedLink(Link):
    """What a UART does to writes: bytes leave at baud/bits_per_byte bytes a second (a start bit,
    8 data bits and a stop bit: 10 bits a byte), so a write returns when its last byte is on the
    wire.  Pseudo-terminals ignore the line speed; wrapping both ends of one in this gives the
    timing of a real serial line (less its latency)."""

    def __init__(self, inner: Link, baud: int, bits_per_byte: int = 10, chunk: int = 16):
        self.inner, self.name = inner, getattr(inner, "name", "paced")
        self.rate, self.chunk = baud / bits_per_byte, chunk
        self._free = time.monotonic()

    def read(self, timeout: float) -> bytes:
        return self.inner.read(timeout)

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            piece = data[i:i + self.chunk]
            now = time.monotonic()
            # a line that was sending goes on from where its last byte ended (the sleep's own
            # lateness is not charged to the line); an idle one starts now
            self._free = (self._free if now - self._free < 0.005 else now) + len(piece) / self.rate
            delay = self._free - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.inner.write(piece)

    def close(self) -> None:
        self.inner.close()
