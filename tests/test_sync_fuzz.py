"""Fuzz: more than ten thousand corrupted frames through a full receiver, and ten thousand
payloads that pass the frame check but are damaged (a buggy peer) through the message decoders
and the ledger.  Every one ends as a clean error (a dropped frame, a MessageError, a refused
step); nothing is lost or corrupted, and the receiver ends with the sender's rows exactly."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from qes_edge.ledger.store import Ledger, LedgerError
from qes_edge.sync import messages as M
from qes_edge.sync.frames import Decoder, encode
from qes_edge.sync.link import Link
from qes_edge.sync.messages import T, MessageError
from qes_edge.sync.session import Channel, Options, Result, Side, Store
from qes_edge.sync.testing import corrupt, synthetic_ledger

SESSION = 0x5EED


class Script(Link):
    """The sender's side as a prepared byte stream, fed in random chunks; once it is used up,
    it answers a request from the end with "done, nothing more" (and ignores everything else)."""
    name = "script"

    def __init__(self, data: bytes, rng, n_steps: int, run_id: str, head: str, seq: int):
        self.data, self.rng, self.pos = data, rng, 0
        self.n, self.run_id, self.head, self.seq = n_steps, run_id, head, seq
        self.dec = Decoder()
        self.requests = 0

    def read(self, timeout: float) -> bytes:
        if self.pos >= len(self.data):
            return b""
        k = int(self.rng.integers(1, 4096))
        out = self.data[self.pos:self.pos + k]
        self.pos += len(out)
        return out

    def write(self, data: bytes) -> None:
        for f in self.dec.feed(data):
            if f.type == T.REQUEST:
                self.requests += 1
                req = M.decode_request(f.payload)
                if self.pos >= len(self.data) and req.start == self.n:
                    self.seq += 1
                    self.data += encode(T.DONE, M.done(M.Done(self.run_id, self.n, self.n, self.n, self.head)),
                                        SESSION, self.seq)


def test_ten_thousand_corrupted_frames_through_a_receiver(tmp_path):
    rng = np.random.default_rng(7)
    n_steps, per_step = 500, 21  # over 10,000 corrupted frames (a reordered pair of steps takes one set)
    src = tmp_path / "src.qes"
    run_id = synthetic_ledger(src, n_steps)
    lg = Ledger(src, readonly=True)
    times = lg.step_times(run_id)
    recs = list(lg.steps(run_id))
    info, head = lg.export_run(run_id), lg.head_hash(run_id)
    lg.close()
    payloads = [M.encode_step(r, times[r.step]) for r in recs]

    parts, seq, corrupted, kinds = [], 0, 0, {}
    i = 0
    while i < n_steps:
        for _ in range(per_step):  # damaged copies of this step (and now and then of a control frame)
            seq += 1
            if rng.random() < 0.1:
                raw = encode(T.DONE, M.done(M.Done(run_id, 0, i, n_steps, head)), SESSION, seq)
            else:
                raw = encode(T.STEP, payloads[i], SESSION, seq)
            bad, kind = corrupt(raw, rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            parts.append(bad)
            corrupted += 1
        r = rng.random()
        if r < 0.05 and i + 1 < n_steps:  # reordered on the way: i+1 overtakes i, then both again
            a, b = encode(T.STEP, payloads[i], SESSION, seq + 1), encode(T.STEP, payloads[i + 1], SESSION, seq + 2)
            parts += [b, a, encode(T.STEP, payloads[i], SESSION, seq + 3),
                      encode(T.STEP, payloads[i + 1], SESSION, seq + 4)]
            seq += 4
            i += 2
            continue
        seq += 1
        good = encode(T.STEP, payloads[i], SESSION, seq)
        parts.append(good)
        if r < 0.15:  # duplicated on the way (same sequence number), or sent twice (a new one)
            parts.append(good)
        elif r < 0.25:
            seq += 1
            parts.append(encode(T.STEP, payloads[i], SESSION, seq))
        i += 1
    assert corrupted >= 10_000

    dst = tmp_path / "dst.qes"
    opts = Options(timeout=0.05, retries=3, engine_noise_spec=1, software="test")
    link = Script(b"".join(parts), rng, n_steps, run_id, head, seq)
    chan = Channel(link, opts, SESSION, "client")
    store = Store(dst)
    side = Side(chan, store, opts, "client", Result())
    side.peer = M.Hello(M.PROTOCOL, "test", "0" * 16, "server", 1, info, n_steps, head)
    side.accepted = True
    t = time.perf_counter()
    side.pull(n_steps)
    store.close()
    elapsed = time.perf_counter() - t
    stats = chan.stats()
    dropped = sum(stats.get(k, 0) for k in ("bad_header", "bad_crc", "bad_field", "other_version", "stalled"))
    print(f"{corrupted} corrupted frames ({kinds}) through the receiver in {elapsed:.1f} s; decoder: {stats}")
    # what came out: the sender's rows, exactly
    a, b = Ledger(src, readonly=True), Ledger(dst, readonly=True)
    try:
        assert b.verify(run_id) == n_steps and b.head_hash(run_id) == head
        cols = "step, threshold, seeds, coefs_q16, rewards, failures, timings, weights_sha256, prev_hash, hash, created"
        assert b.db.execute(f"select {cols} from steps").fetchall() == \
            a.db.execute(f"select {cols} from steps").fetchall()
    finally:
        a.close()
        b.close()
    assert dropped > 0.5 * corrupted and stats.get("stale", 0) > 0
    assert elapsed < 120


def mutate(payload: bytes, rng) -> bytes:
    """One to three random flips, deletions, insertions or truncations."""
    b = bytearray(payload)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 4))
        if op == 0 and b:
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and b:
            i = int(rng.integers(0, len(b)))
            del b[i:i + int(rng.integers(1, 9))]
        elif op == 2:
            i = int(rng.integers(0, len(b) + 1))
            b[i:i] = rng.bytes(int(rng.integers(1, 9)))
        else:
            b = b[:int(rng.integers(0, len(b) + 1))]
    return bytes(b)


def test_ten_thousand_damaged_step_payloads_are_refused(tmp_path):
    """Payloads that pass the frame check but were damaged (a buggy peer): each is refused by
    the decoder or by the chain; the receiver's ledger gains nothing from them."""
    rng = np.random.default_rng(11)
    src = tmp_path / "src.qes"
    run_id = synthetic_ledger(src, 4)
    lg = Ledger(src, readonly=True)
    recs, times, info = list(lg.steps(run_id)), lg.step_times(run_id), lg.export_run(run_id)
    lg.close()
    dst = Ledger(tmp_path / "dst.qes")
    dst.import_run(info)
    dst.append_received(run_id, recs[0], times[0])
    target = M.encode_step(recs[1], times[1])

    def only_created(bad: bytes) -> bool:  # `created` is not chained (an observation, like the time of receipt)
        return len(bad) == len(target) and bad[:24] == target[:24] and bad[32:] == target[32:]
    outcomes = {"MessageError": 0, "LedgerError": 0}
    t = time.perf_counter()
    n = 0
    while n < 10_000:
        bad = mutate(target, rng)
        if bad == target or only_created(bad):
            continue
        n += 1
        try:
            rec, created = M.decode_step(bad)
        except MessageError:
            outcomes["MessageError"] += 1
            continue
        with pytest.raises(LedgerError):
            dst.append_received(run_id, rec, created)
        outcomes["LedgerError"] += 1
    assert dst.verify(run_id) == 1 and dst.head(run_id) == (1, recs[0].hash)
    dst.append_received(run_id, M.decode_step(target)[0], times[1])  # the intact one still goes in
    assert dst.verify(run_id) == 2
    dst.close()
    print(f"10,000 damaged step payloads in {time.perf_counter() - t:.1f} s: {outcomes}")
    assert outcomes["MessageError"] > 1000 and outcomes["LedgerError"] > 500


@pytest.mark.parametrize("kind", ["hello", "request", "done", "hashes?", "hashes", "bye", "error", "pull"])
def test_damaged_control_messages_decode_or_raise_message_error(kind, tmp_path):
    rng = np.random.default_rng(len(kind))
    run_id, h = "a" * 32, "b" * 64
    good = {
        "hello": (M.decode_hello, M.encode_json(M.Hello(1, "0.1.0", "c" * 16, "client", 1, {
            "run_id": run_id, "created": 1.5, "base_sha256": h, "base_name": "m.gguf", "config": "{}",
            "noise_spec": 1, "hash": h}, 3, h).to_json())),
        "request": (M.decode_request, M.request(M.Request(run_id, 3, 64, h))),
        "done": (M.decode_done, M.done(M.Done(run_id, 3, 10, 12, h))),
        "hashes?": (M.decode_hashes_q, M.hashes_q(run_id, [1, 2, 3])),
        "hashes": (M.decode_hashes, M.hashes(run_id, {1: h, 2: h})),
        "bye": (M.decode_bye, M.bye(4, h, False)),
        "error": (M.decode_error, M.error("fork", "fork at step 3", step=3)),
        "pull": (M.decode_pull, M.pull(run_id)),
    }
    decode, payload = good[kind]
    decode(payload)
    for _ in range(1500):
        bad = mutate(payload, rng)
        try:
            decode(bad)
        except MessageError:
            pass
    # and JSON of the right shape with wrong types, in every field
    obj = json.loads(payload)
    for key in obj:
        for value in (None, -1, 2**70, "x", [], {}, 1.5, True, "z" * 70):
            try:
                decode(M.encode_json({**obj, key: value}))
            except MessageError:
                pass
