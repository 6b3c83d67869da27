"""The sync protocol: two ledgers of one run brought to the same head (docs/sync-protocol.md).

Both sides say hello (protocol version, engine noise spec, the run on offer with its base
model, and the head); whatever differs that makes syncing wrong is refused, naming it.  The
client (`qes-edge sync --peer`) decides what happens next, the server (`qes-edge sync serve`)
answers:

- the same head on both: nothing to do;
- both hold steps: the client compares hashes at a few steps (hashes?/hashes) to find the first
  step where the two chains differ; a fork is reported, never merged, and nothing is written;
- one side is behind: it *pulls*.  The client pulls by itself; to push, it asks the server to
  pull (pull).  The puller asks for steps from its own head (request: from, count, its head
  hash); the other side streams them, one frame each, then says done with its head.  Every step
  is checked against the puller's chain (its payload after the puller's head must hash to the
  hash it carries) and appended in a transaction of its own: a drop loses at most the step in
  flight, and running sync again continues from the head.  A damaged frame is dropped by the
  CRC; a lost, duplicated or reordered step is noticed by its number and asked for again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qes_edge.ledger.store import Ledger, LedgerError, check_not_directory
from qes_edge.sync import messages as M
from qes_edge.sync.defaults import RETRIES, TIMEOUT_S
from qes_edge.sync.frames import Decoder, Frame, encode
from qes_edge.sync.link import Link, LinkClosed, LinkError
from qes_edge.sync.messages import T, MessageError


# -- outcomes ------------------------------------------------------------------------------

class SyncError(Exception):
    """Sync did not complete.  `exit_code`: 1 the link failed (what was received is kept: run
    sync again), 2 refused (an incompatible peer, a bad ledger), 3 a fork."""
    exit_code = 2


class Refused(SyncError):
    exit_code = 2


class ForkError(SyncError):
    exit_code = 3


class Incomplete(SyncError):
    exit_code = 1


class Unavailable(Refused):
    """A server with nothing to offer yet (a daemon before its first job's ledger has a run):
    error code `unavailable`; a follower waits and asks again."""


def _being_created(path: Path) -> bool:
    """A served ledger the daemon has created but not yet written its tables into: empty, or an
    SQLite file without a table (its schema is written in one transaction, so a reader sees all
    of it or none)."""
    import sqlite3
    try:
        if path.stat().st_size == 0:
            return True
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 0
        finally:
            con.close()
    except (OSError, sqlite3.Error):
        return False


class PeerError(SyncError):
    """The peer ended the session with an error (a refusal, a fork it found)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"the peer refused: {message}" if code != "fork" else message)
        self.code = code
        self.exit_code = 3 if code == "fork" else 2


@dataclass
class Options:
    timeout: float = TIMEOUT_S  # seconds without a frame from the peer before a message is sent again
    retries: int = RETRIES      # such timeouts in a row (and, for the client, reconnections) before giving up
    window: int = 64       # steps per request
    slice: float = 0.05    # how long one read of the link waits
    engine_noise_spec: int | None = None  # None: the native library's
    software: str | None = None
    protocol: int = M.PROTOCOL  # what this side's hello says (another value only in tests)

    def noise_spec(self) -> int:
        if self.engine_noise_spec is None:
            from qes_edge.native import binding as _native
            self.engine_noise_spec = int(_native.lib.qes_noise_spec_version())
        return self.engine_noise_spec

    def version(self) -> str:
        if self.software is None:
            from qes_edge import __version__
            self.software = __version__
        return self.software


@dataclass
class Result:
    """What one sync (or one served session) did."""
    action: str = "none"           # received, sent, up to date, refused, fork, incomplete, ended
    peer: str = ""
    run_id: str | None = None
    first: int | None = None       # the steps that crossed the wire (new to their receiver)
    last: int | None = None
    n_steps: int = 0               # this ledger's step count and head afterwards
    head: str | None = None
    peer_n_steps: int | None = None
    peer_head: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    sessions: int = 0
    error: str | None = None
    exit_code: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return 0 if self.first is None else self.last - self.first + 1

    def add_steps(self, first: int, last: int) -> None:
        self.first = first if self.first is None else min(self.first, first)
        self.last = last if self.last is None else max(self.last, last)

    def line(self) -> str:
        kb = (self.bytes_in if self.action == "received" else self.bytes_out) / 1000
        if self.action == "received" and self.first is None:
            return f"received run {self.run_id} (no step recorded yet) from {self.peer}; head {self.head}"
        if self.action == "received":
            return (f"received steps {self.first}..{self.last} ({self.steps} steps, {kb:.1f} kB) from {self.peer}; "
                    f"head {self.head}")
        if self.action == "sent":
            return (f"sent steps {self.first}..{self.last} ({self.steps} steps, {kb:.1f} kB) to {self.peer}; "
                    f"head {self.peer_head or self.head}")
        if self.action == "up to date":
            return f"up to date with {self.peer}: run {self.run_id}, {self.n_steps} steps; head {self.head}"
        return f"{self.action}: {self.error or ''}".strip()

    def to_json(self) -> dict:
        return {"action": self.action, "peer": self.peer, "run_id": self.run_id, "first": self.first,
                "last": self.last, "steps": self.steps, "n_steps": self.n_steps, "head": self.head,
                "peer_n_steps": self.peer_n_steps, "peer_head": self.peer_head, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3), "sessions": self.sessions,
                "error": self.error, "stats": self.stats}


# -- the ledger side -----------------------------------------------------------------------------

class Store:
    """The ledger this side syncs: opened for writing only when it exists (it is created when a
    run is received), the run chosen, its chain and head verified before anything is offered."""

    def __init__(self, path: str | Path, run_id: str | None = None, prefer: str | None = None,
                 readonly: bool = False):
        self.path = Path(path)
        self.lg: Ledger | None = None
        self.run_id: str | None = None
        self.want: str | None = None
        self.readonly = readonly  # only sends (a daemon serving the ledger it trains): opened read-only
        try:
            check_not_directory(self.path)
        except LedgerError as e:
            raise Refused(str(e)) from None
        if readonly and not self.path.exists():
            raise Refused(f"{self.path}: no ledger there yet")
        if self.path.exists():
            try:
                self.lg = Ledger(self.path, readonly=readonly)
            except LedgerError as e:
                raise Refused(str(e)) from None
        elif not self.path.parent.is_dir():
            raise Refused(f"the folder {self.path.parent} does not exist")
        self.choose(run_id, prefer)

    def choose(self, run_id: str | None, prefer: str | None = None) -> None:
        ids = set()
        if self.lg is not None:
            ids = {r for (r,) in self.lg.db.execute("select run_id from runs").fetchall()}
        if prefer is not None and prefer in ids:
            chosen = prefer
        elif run_id is not None:
            chosen = run_id if run_id in ids else None
            self.want = None if chosen else run_id
        else:
            chosen = self.lg.run().run_id if ids else None
        self.run_id = chosen
        if chosen is not None:
            try:
                self.lg.verify(chosen)
            except LedgerError as e:
                raise Refused(f"{self.path}: {e}") from None

    def head(self) -> tuple[int, str | None]:
        if self.run_id is None:
            return 0, None
        h = self.lg.head(self.run_id)
        if h is None:  # pragma: no cover - a writable ledger always has heads
            return sum(1 for _ in self.lg.steps(self.run_id)), self.lg.head_hash(self.run_id)
        return h

    def run_hash(self) -> str:
        return self.lg.run(self.run_id).hash

    def export(self) -> dict | None:
        return None if self.run_id is None else self.lg.export_run(self.run_id)

    def hashes(self, steps) -> dict[int, str]:
        return {} if self.run_id is None else self.lg.step_hashes(self.run_id, steps)

    def hash_before(self, n: int) -> str | None:
        """The hash a step n chains to: the run's for 0, else step n-1's (None if not held)."""
        if n == 0:
            return self.run_hash()
        return self.hashes([n - 1]).get(n - 1)

    def steps(self, start: int, stop: int):
        times = self.lg.step_times(self.run_id, start, stop)
        return [(rec, times.get(rec.step)) for rec in self.lg.steps(self.run_id, start, stop)]

    def import_run(self, info: dict) -> None:
        try:
            if self.lg is None:
                self.lg = Ledger(self.path)
            self.run_id = self.lg.import_run(info).run_id
        except LedgerError as e:
            raise Refused(str(e)) from None

    def append(self, rec, created) -> None:
        self.lg.append_received(self.run_id, rec, created)

    def hello(self, opts: Options, node: str, role: str) -> M.Hello:
        n, head = self.head()
        return M.Hello(opts.protocol, opts.version(), node, role, opts.noise_spec(), self.export(), n, head, self.want)

    def close(self) -> None:
        if self.lg is not None:
            self.lg.close()
            self.lg = None


# -- the comparison both sides make from the two hellos ------------------------------------

def _short(h: str | None) -> str:
    return f"{h[:16]}…" if h else "none"


def compare(mine: M.Hello, peer: M.Hello, receiving_engine: int | None = None) -> None:
    """Raise Refused naming what differs, for a peer this side must not sync with."""
    if peer.protocol != mine.protocol:
        raise Refused(f"the peer speaks sync protocol v{peer.protocol} (qes-edge {peer.software}), this qes-edge "
                      f"speaks v{mine.protocol}: update the older one")
    if peer.node == mine.node:
        raise Refused("the link echoes this side's own frames back (loop:// or a looped-back line): there is no peer "
                      "on it")
    if peer.engine_noise_spec != mine.engine_noise_spec:
        raise Refused(f"the peer's engine implements noise spec v{peer.engine_noise_spec} (qes-edge {peer.software}), "
                      f"this one v{mine.engine_noise_spec}: steps recorded on one would not replay to the same weights "
                      "on the other; update the older qes-edge")
    a, b = mine.run, peer.run
    if a is None and b is None:
        want = mine.want_run or peer.want_run
        raise Refused(f"neither ledger holds run {want}: nothing to sync" if want
                      else "neither this ledger nor the peer's holds a run: nothing to sync")
    if a is not None and b is not None:
        if a["base_sha256"] != b["base_sha256"]:
            raise Refused(f"the peer's base model is {b['base_name']} (sha256 {_short(b['base_sha256'])}), this "
                          f"ledger's is {a['base_name']} (sha256 {_short(a['base_sha256'])}): runs on different base "
                          "models are never synced")
        if a["run_id"] != b["run_id"]:
            raise Refused(f"the peer's run is {b['run_id']} ({peer.n_steps} steps), this ledger's is {a['run_id']} "
                          f"({mine.n_steps} steps), on the same base model {a['base_name']}: two different runs are "
                          "not merged (sync into another ledger, or name a run with --run-id)")
        if a["hash"] != b["hash"]:
            raise Refused(f"run {a['run_id']}: the peer's run row hashes to {_short(b['hash'])}, this ledger's to "
                          f"{_short(a['hash'])}: the same run id with another config or base (an edited ledger)")
    if a is None and mine.want_run and b["run_id"] != mine.want_run:
        raise Refused(f"the peer does not hold run {mine.want_run} (it offers run {b['run_id']})")
    if b is None and peer.want_run and a["run_id"] != peer.want_run:
        raise Refused(f"this ledger does not hold run {peer.want_run}, which the peer asks for (it holds "
                      f"{a['run_id']})")
    run = a if a is not None else b
    if run["noise_spec"] != mine.engine_noise_spec:
        raise Refused(f"run {run['run_id']} was recorded with noise spec v{run['noise_spec']}, and the engines on "
                      f"both sides implement v{mine.engine_noise_spec}: it would not replay on either")


def fork_message(run_id: str, k: int, mine_n: int, mine_head: str, mine_k: str, peer_n: int, peer_head: str,
                 peer_k: str) -> str:
    common = (f"both hold steps 0..{k - 1} of run {run_id}" if k else f"both hold run {run_id} but no step in common")
    return (f"fork at step {k}: {common}; this ledger has steps {k}..{mine_n - 1} (step {k} {_short(mine_k)}, head "
            f"{_short(mine_head)}), the peer has steps {k}..{peer_n - 1} (step {k} {_short(peer_k)}, head "
            f"{_short(peer_head)}). Nothing was written. To keep one branch, move the other device's ledger aside and "
            "sync it again from this one (or the reverse); to keep both, continue one as a new run (qes-edge branch)")


# -- one session's frames ---------------------------------------------------------------------

class Channel:
    """Frames over a link within one session: numbered going out; coming in, only intact frames
    of this session with a sequence number above the last one seen (a duplicated or stale frame
    is dropped and counted)."""

    def __init__(self, link: Link, opts: Options, session: int | None, role: str):
        self.link, self.opts, self.role = link, opts, role
        self.session = session
        self.dec = Decoder()
        self.seq_out = 0
        self.last_seq = -1
        self.bytes_in = self.bytes_out = 0
        self.dropped = {"stale": 0, "other_session": 0}
        self.other_hello: Frame | None = None
        self._queue: list[Frame] = []
        self._quiet_since = time.monotonic()

    def send(self, mtype: int, payload: bytes) -> None:
        data = encode(int(mtype), payload, self.session or 0, self.seq_out)
        self.seq_out = (self.seq_out + 1) & 0xFFFFFFFF
        self.link.write(data)
        self.bytes_out += len(data)

    def adopt(self, f: Frame) -> None:
        """Begin the session a hello opened (the server's side)."""
        self.session, self.last_seq = f.session, f.seq

    def _accept(self, f: Frame) -> bool:
        if self.session is None:
            return f.type == T.HELLO
        if f.session != self.session:
            if f.type == T.HELLO and self.role == "server":
                self.other_hello = f
                return True
            self.dropped["other_session"] += 1
            return False
        if f.seq <= self.last_seq:
            self.dropped["stale"] += 1
            return False
        self.last_seq = f.seq
        return True

    def recv(self, timeout: float) -> Frame | None:
        """The next acceptable frame, or None when none came within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            while self._queue:
                f = self._queue.pop(0)
                if self._accept(f):
                    return f
            now = time.monotonic()
            if now >= deadline and timeout > 0:
                return None
            data = self.link.read(min(self.opts.slice, max(0.0, deadline - now)))
            if data:
                self.bytes_in += len(data)
                self._queue.extend(self.dec.feed(data))
                self._quiet_since = time.monotonic()
            elif self.dec.pending and time.monotonic() - self._quiet_since > min(1.0, self.opts.timeout / 2):
                self._queue.extend(self.dec.give_up_partial())  # the rest of that frame is not coming
                self._quiet_since = time.monotonic()
            if timeout <= 0 and not self._queue:
                return None

    def stats(self) -> dict:
        s = {k: v for k, v in self.dec.stats.items() if v}
        s.update({k: v for k, v in self.dropped.items() if v})
        return s


# -- one side of a session -------------------------------------------------------------------

class Side:
    """A side of a session: its ledger, its channel, and the duties every side has whatever else
    it does: answer hashes? and stream the steps a request asks for (interrupted by the next
    request)."""

    def __init__(self, chan: Channel, store: Store, opts: Options, role: str, result: Result):
        self.chan, self.store, self.opts, self.role, self.result = chan, store, opts, role, result
        self.node = f"{random.getrandbits(64):016x}"
        self.mine: M.Hello | None = None
        self.peer: M.Hello | None = None
        self.accepted = False
        self._stream: list | None = None
        self._req: M.Request | None = None
        self.sent: set[int] = set()
        self.peer_has_all = False  # a request from our head came: the peer holds every step we do
        self.frames_in = 0

    def say_hello(self) -> None:
        self.mine = self.store.hello(self.opts, self.node, self.role)
        self.chan.send(T.HELLO, M.encode_json(self.mine.to_json()))

    def send_error(self, code: str, message: str, **detail) -> None:
        try:
            self.chan.send(T.ERROR, M.error(code, message, **detail))
        except LinkClosed:
            pass

    def violation(self, e: Exception, what: str):
        msg = f"the peer sent a malformed {what} ({e})"
        self.send_error("protocol", msg)
        return Refused(msg)

    # the duties
    def _duty(self, f: Frame) -> bool:
        t = f.type
        if t == T.HELLO:
            if self.role == "server" and self.peer is not None and f.session == self.chan.session:
                self.chan.send(T.HELLO, M.encode_json(self.mine.to_json()))  # our answer was lost
                return True
            return self.role != "server" and self.peer is not None  # a client ignores a repeated hello
        if t == T.ERROR:
            try:
                err = M.decode_error(f.payload)
            except MessageError as e:
                raise Refused(f"the peer ended the session with an error that cannot be decoded ({e})") from None
            raise PeerError(err["code"], err["message"])
        if t == T.HASHES_Q and self.accepted:
            try:
                run_id, steps = M.decode_hashes_q(f.payload)
            except MessageError as e:
                raise self.violation(e, "hashes?") from None
            found = self.store.hashes(steps) if run_id == self.store.run_id else {}
            self.chan.send(T.HASHES, M.hashes(run_id, found))
            return True
        if t == T.REQUEST and self.accepted:
            try:
                req = M.decode_request(f.payload)
            except MessageError as e:
                raise self.violation(e, "request") from None
            self._start_stream(req)
            return True
        return t in (T.HASHES_Q, T.REQUEST)  # not accepted yet: the peer asks again

    def _start_stream(self, req: M.Request) -> None:
        if req.run_id != self.store.run_id:
            msg = f"the peer asks for run {req.run_id}; this side offers {self.store.run_id}"
            self.send_error("run", msg)
            raise Refused(msg)
        n, head = self.store.head()
        at = self.store.hash_before(req.start) if req.start <= n else None
        if at != req.head:
            self._refuse_fork_at_request(req, n, head)
        end = min(req.start + req.count, n)
        self.peer_has_all = req.start == n
        self._req, self._stream = req, self.store.steps(req.start, end)
        self._end, self._n, self._head = end, n, head

    def _refuse_fork_at_request(self, req: M.Request, n: int, head: str) -> None:
        # the requester's chain is not a prefix of ours: find where they part (hashes we hold vs
        # the one it sent cannot locate it; say what is known)
        msg = (f"the peer's head at step {req.start - 1} is {_short(req.head)}, this ledger's "
               + (f"is {_short(self.store.hash_before(req.start))}" if req.start <= n else f"ends at step {n - 1}")
               + f" (head {_short(head)}): the two ledgers of run {req.run_id} have forked. Nothing was written")
        self.send_error("fork", msg)
        raise ForkError(msg)

    def _stream_one(self) -> None:
        if self._stream:
            rec, created = self._stream.pop(0)
            self.chan.send(T.STEP, M.encode_step(rec, created))
            if rec.step not in self.sent:
                self.sent.add(rec.step)
                self.result.add_steps(rec.step, rec.step)
            return
        n, head = self.store.head()
        self.chan.send(T.DONE, M.done(M.Done(self._req.run_id, self._req.start, self._end, n, head)))
        self._stream = None

    def wait(self, timeout: float) -> Frame | None:
        """The next frame that is not a duty (answered here), or None after `timeout` seconds in
        which no frame at all came from the peer."""
        deadline = time.monotonic() + timeout
        while True:
            if self._stream is not None:
                self._stream_one()
                f = self.chan.recv(0)
                deadline = time.monotonic() + timeout  # sending: the peer is not expected to speak
            else:
                f = self.chan.recv(max(0.0, deadline - time.monotonic()))
            if f is None:
                if self._stream is None and time.monotonic() >= deadline:
                    return None
                continue
            deadline = time.monotonic() + timeout
            self.frames_in += 1
            if not self._duty(f):
                return f

    # asking
    def ask_hashes(self, steps: list[int]) -> dict[int, str]:
        run_id = self.store.run_id
        misses = 0
        self.chan.send(T.HASHES_Q, M.hashes_q(run_id, steps))
        while True:
            f = self.wait(self.opts.timeout)
            if f is None:
                misses += 1
                if misses > self.opts.retries:
                    raise Incomplete(f"the peer stopped answering ({misses} hash queries unanswered)")
                self.chan.send(T.HASHES_Q, M.hashes_q(run_id, steps))
                continue
            if f.type == T.HASHES:
                try:
                    rid, found = M.decode_hashes(f.payload)
                except MessageError as e:
                    raise self.violation(e, "hashes") from None
                if rid == run_id and set(steps) <= set(found):
                    return found

    def find_fork(self, m: int) -> int | None:
        """The first step (< m, both hold them) whose hash differs between the two ledgers; None
        when steps 0..m-1 agree.  One query for step m-1, then a 16-way search."""
        if m == 0:
            return None
        mine = self.store.hashes([m - 1])
        if self.ask_hashes([m - 1])[m - 1] == mine[m - 1]:
            return None
        lo, hi = 0, m - 1  # steps < lo agree, step hi differs
        while lo < hi:
            points = sorted({lo + (hi - lo) * i // 16 for i in range(16)})
            theirs, ours = self.ask_hashes(points), self.store.hashes(points)
            differ = [p for p in points if theirs[p] != ours[p]]
            new_hi = min(differ, default=hi)
            lo = max([p + 1 for p in points if p < new_hi and theirs[p] == ours[p]], default=lo)
            hi = new_hi
        return lo

    def pull(self, peer_n: int, progress: Callable[[int, int], None] | None = None) -> None:
        """Ask for steps from this side's head until the peer says it has no more; each one
        checked against the chain and appended in its own transaction."""
        store, opts = self.store, self.opts
        if store.run_id is None:
            store.import_run(self.peer.run)
            self.result.stats["run_created"] = 1
        run_id = store.run_id
        n, head = store.head()
        target, misses, confirmed = peer_n, 0, False
        while not confirmed:  # until a request from the head is answered with "nothing more"
            req = M.Request(run_id, n, min(opts.window, M.MAX_WINDOW), head)
            self.chan.send(T.REQUEST, M.request(req))
            asked_again = False
            while True:
                f = self.wait(opts.timeout)
                if f is None:
                    misses += 1
                    if misses > opts.retries:
                        raise Incomplete(f"the peer stopped sending ({misses} requests unanswered)")
                    break
                if f.type == T.STEP:
                    try:
                        rec, created = M.decode_step(f.payload)
                    except MessageError as e:
                        raise self.violation(e, "step") from None
                    if rec.step != n:
                        key = "steps_repeated" if rec.step < n else "steps_after_a_gap"
                        self.result.stats[key] = self.result.stats.get(key, 0) + 1
                        if rec.step > n and not asked_again:  # one was lost: ask again from the head
                            asked_again = True
                            req = M.Request(run_id, n, min(opts.window, M.MAX_WINDOW), head)
                            self.chan.send(T.REQUEST, M.request(req))
                        continue
                    try:
                        store.append(rec, created)
                    except LedgerError as e:
                        msg = f"step {rec.step} from the peer is refused: {e}"
                        self.send_error("chain", msg)
                        raise Refused(msg) from None
                    self.result.add_steps(rec.step, rec.step)
                    n, head, misses, asked_again = n + 1, rec.hash, 0, False
                    target = max(target, n)
                    if progress:
                        progress(n, target)
                elif f.type == T.DONE:
                    try:
                        d = M.decode_done(f.payload)
                    except MessageError as e:
                        raise self.violation(e, "done") from None
                    if d.run_id != run_id or d.start != req.start:
                        continue  # the end of a stream that a later request replaced
                    target = d.n_steps
                    confirmed = d.start == n == d.n_steps
                    break  # the next window, or what did not come: ask from the head again
        self.result.n_steps, self.result.head = n, head

    def finish(self, ack: bool) -> M.Hello | None:
        """Say bye (with this side's head) and wait for the peer's; a lost bye costs a few
        repeats, never data (everything received is already committed)."""
        n, head = self.store.head()
        for _ in range(2 if ack else max(2, self.opts.retries)):
            try:
                self.chan.send(T.BYE, M.bye(n, head, ack))
            except LinkClosed:
                return None
            if ack:
                return None
            try:
                f = self.wait(self.opts.timeout)
            except LinkClosed:
                return None
            while f is not None and f.type != T.BYE:
                f = self.wait(self.opts.timeout)
            if f is not None:
                try:
                    b = M.decode_bye(f.payload)
                except MessageError:
                    return None
                self.result.peer_n_steps, self.result.peer_head = b["n_steps"], b["head"]
                return None
        return None


# -- the client: qes-edge sync --peer ---------------------------------------------------------

def _handshake(side: Side, url: str) -> M.Hello:
    chan, opts = side.chan, side.opts
    side.say_hello()
    misses = 0
    while True:
        f = chan.recv(opts.timeout)
        if f is None:
            misses += 1
            if misses > opts.retries:
                seen = chan.dec.versions_seen
                if seen and not chan.dec.stats["frames"]:
                    raise Refused(f"{url} sends frames of version {', '.join(map(str, sorted(seen)))}; this qes-edge "
                                  "speaks frame version 1: update the older one")
                raise Incomplete(f"no answer from {url} after {misses} hellos: is `qes-edge sync serve` running "
                                 "there, on the same line speed?")
            chan.send(T.HELLO, M.encode_json(side.mine.to_json()))
            continue
        if f.type == T.HELLO:
            try:
                return M.decode_hello(f.payload)
            except MessageError as e:
                raise side.violation(e, "hello") from None
        side._duty(f)  # an error raises; anything else before the hello is ignored


def client_session(link: Link, ledger: str | Path, run_id: str | None, opts: Options, url: str,
                   result: Result, progress=None) -> None:
    store = Store(ledger, run_id)
    try:
        chan = Channel(link, opts, random.getrandbits(32) | 1, "client")
        side = Side(chan, store, opts, "client", result)
        try:
            peer = _handshake(side, url)
            side.peer = peer
            compare(side.mine, peer)
            side.accepted = True
            result.peer_n_steps, result.peer_head = peer.n_steps, peer.head
            mine = side.mine
            result.run_id = (mine.run or peer.run)["run_id"]
            if mine.run is not None and peer.run is not None:
                m = min(mine.n_steps, peer.n_steps)
                k = None
                if not (mine.n_steps == peer.n_steps and mine.head == peer.head):
                    k = side.find_fork(m)
                if k is not None:
                    mk, pk = store.hashes([k])[k], side.ask_hashes([k])[k]
                    msg = fork_message(result.run_id, k, mine.n_steps, mine.head, mk, peer.n_steps, peer.head, pk)
                    side.send_error("fork", fork_message(result.run_id, k, peer.n_steps, peer.head, pk, mine.n_steps,
                                                         mine.head, mk), step=k)
                    result.action = "fork"
                    raise ForkError(msg)
            behind = mine.run is None or mine.n_steps < peer.n_steps
            ahead = peer.run is None or peer.n_steps < mine.n_steps
            if behind:
                side.pull(peer.n_steps, progress)
                result.action = "received" if result.first is not None or result.stats.get("run_created") \
                    else "up to date"
                side.finish(ack=False)
            elif ahead:
                side.chan.send(T.PULL, M.pull(result.run_id))
                result.stats["pushed"] = 1
                misses, heard = 0, 0
                while True:
                    try:
                        f = side.wait(opts.timeout)
                    except LinkClosed:
                        if side.peer_has_all:  # it holds everything; only its bye was lost
                            break
                        raise
                    if f is None:
                        misses = 1 if side.frames_in != heard else misses + 1  # in a row, without a frame
                        heard = side.frames_in
                        if side.peer_has_all and misses > 1:
                            break
                        if misses > opts.retries:
                            raise Incomplete(f"the peer stopped pulling ({misses} waits without a frame)")
                        if not side.sent:
                            side.chan.send(T.PULL, M.pull(result.run_id))
                        continue
                    if f.type == T.BYE:
                        try:
                            b = M.decode_bye(f.payload)
                        except MessageError as e:
                            raise side.violation(e, "bye") from None
                        result.peer_n_steps, result.peer_head = b["n_steps"], b["head"]
                        side.finish(ack=True)
                        break
                result.action = "sent" if result.first is not None else "up to date"
            else:
                result.action = "up to date"
                side.finish(ack=False)
            result.n_steps, result.head = store.head()
        finally:
            result.bytes_in += chan.bytes_in
            result.bytes_out += chan.bytes_out
            for k, v in chan.stats().items():
                result.stats[k] = result.stats.get(k, 0) + v
    finally:
        store.close()


def sync(connect: Callable[[], Link] | str, ledger: str | Path, run_id: str | None = None,
         opts: Options | None = None, progress=None, baudrate: int = 115200) -> Result:
    """Bring `ledger` and the peer's to the same head (qes-edge sync --peer).  `connect` is a URL
    or a function that opens a link (tests).  A link that drops is opened again, up to
    opts.retries times; every step received before it dropped is kept."""
    from qes_edge.sync.link import open_link
    opts = opts or Options()
    url = connect if isinstance(connect, str) else getattr(connect, "url", "the peer")
    result = Result(peer=url)
    t0 = time.monotonic()
    drops, last_error = 0, None
    while True:
        try:
            link = open_link(connect, baudrate) if isinstance(connect, str) else connect()
        except LinkError as e:
            if drops == 0:
                raise Refused(str(e)) from None
            link, last_error = None, str(e)
        if link is not None:
            result.sessions += 1
            try:
                client_session(link, ledger, run_id, opts, url, result, progress)
                result.seconds = time.monotonic() - t0
                return result
            except (LinkClosed, Incomplete) as e:
                last_error = str(e)
            finally:
                link.close()
        drops += 1
        if drops > opts.retries:
            result.seconds = time.monotonic() - t0
            if result.stats.get("pushed"):
                kept = "the peer keeps every step it received"
            else:
                kept = (f"steps {result.first}..{result.last} were received and kept" if result.first is not None
                        else "nothing was received")
            raise Incomplete(f"the link to {url} failed {drops} times (last: {last_error}); {kept}; run sync again "
                             "to continue from this ledger's head")
        time.sleep(min(2.0, 0.1 * 2 ** drops))


# -- the server: qes-edge sync serve ------------------------------------------------------------

def serve_session(link: Link, ledger: str | Path | Callable[[], str | Path | None], run_id: str | None,
                  opts: Options, name: str = "", first: Frame | None = None, idle: float | None = None,
                  finished: set | None = None, stop: Callable[[], bool] | None = None,
                  hello_wait: float | None = None, readonly: bool = False) -> tuple[Result, Frame | None]:
    """Answer one client from its hello to its bye.  Returns the result and, on a serial line, a
    hello of a new session that arrived before this one ended (the client started again).
    hello_wait: how long to wait for the hello (None: until one comes or stop()).
    ledger may be a function giving the path to serve when a hello comes (None: nothing to
    serve yet; the daemon serves the ledger of the job it trains).  readonly: the ledger is
    opened read-only and only sent from; a client that asks this side to pull is refused."""
    result = Result(peer=name or link.name)
    chan = Channel(link, opts, None, "server")
    t0 = time.monotonic()
    idle = opts.timeout * (opts.retries + 1) if idle is None else idle
    finished = finished if finished is not None else set()
    # wait for a hello that opens a session this line has not finished
    f = first
    while f is None or f.type != T.HELLO or f.session in finished:
        if (stop is not None and stop()) or (hello_wait is not None and time.monotonic() - t0 > hello_wait):
            result.action = "ended"
            result.error = None if stop is not None and stop() else f"no hello within {hello_wait:.0f} s"
            return result, None
        f = chan.recv(opts.timeout)
        if f is not None and (f.type != T.HELLO or f.session in finished):
            chan.session, f = None, None
    chan.adopt(f)
    finished.add(f.session)
    store = None
    try:
        try:
            peer = M.decode_hello(f.payload)
        except MessageError as e:
            chan.send(T.ERROR, M.error("protocol", f"a malformed hello ({e})"))
            result.action, result.error, result.exit_code = "refused", f"the peer sent a malformed hello ({e})", 2
            return result, None
        prefer = (peer.run or {}).get("run_id") or peer.want_run
        path = ledger() if callable(ledger) else ledger
        try:
            if path is None or (readonly and not Path(path).exists()):
                raise Unavailable("the peer has no run to offer yet (its daemon has not started a job's run)")
            try:
                store = Store(path, run_id, prefer, readonly=readonly)
            except Refused:
                if readonly and _being_created(Path(path)):
                    raise Unavailable(f"the peer has no run to offer yet ({Path(path).name} is being created)") from None
                raise
            if readonly and store.run_id is None:
                raise Unavailable(f"the peer has no run to offer yet ({Path(path).name} holds "
                                  + (f"no run {run_id or prefer})" if run_id or prefer else "no run)"))
        except Unavailable as e:
            chan.send(T.ERROR, M.error("unavailable", str(e)))
            raise
        except Refused as e:  # this ledger cannot be used: tell the client why
            chan.send(T.ERROR, M.error("ledger", f"the peer's ledger cannot be used: {e}"))
            raise
        side = Side(chan, store, opts, "server", result)
        side.peer = peer
        side.say_hello()
        result.run_id = (side.mine.run or peer.run or {}).get("run_id")
        result.peer_n_steps, result.peer_head = peer.n_steps, peer.head
        try:
            compare(side.mine, peer)
        except Refused as e:
            side.send_error("refused", str(e))
            raise
        side.accepted = True
        while True:
            try:
                g = side.wait(idle if not side.peer_has_all else opts.timeout * 2)
            except LinkClosed:
                if not side.peer_has_all:
                    raise
                g = None
            if g is None:
                if side.peer_has_all:  # it pulled everything; only its bye was lost
                    result.action = "sent" if result.first is not None else "up to date"
                    break
                result.action = "incomplete"
                result.error = f"the peer went quiet for {idle:.0f} s"
                result.exit_code = 1
                break
            if chan.other_hello is not None:  # the client started again (serial line)
                nxt, chan.other_hello = chan.other_hello, None
                if nxt.session in finished:
                    continue  # a late copy of a finished session's hello
                result.action = result.action if result.first is not None else "ended"
                return result, nxt
            if g.type == T.PULL and store.readonly:
                msg = "this server only sends (it serves a ledger that is being trained): sync the other way"
                side.send_error("refused", msg)
                raise Refused(msg)
            if g.type == T.PULL:
                side.pull(peer.n_steps)
                result.action = "received" if result.first is not None or result.stats.get("run_created") \
                    else "up to date"
                side.finish(ack=False)
                break
            if g.type == T.BYE:
                try:
                    b = M.decode_bye(g.payload)
                    result.peer_n_steps, result.peer_head = b["n_steps"], b["head"]
                except MessageError:
                    pass
                side.finish(ack=True)
                result.action = "sent" if result.first is not None else "up to date"
                break
    except SyncError as e:
        result.action = "fork" if e.exit_code == 3 else ("incomplete" if e.exit_code == 1 else "refused")
        result.error, result.exit_code = str(e), e.exit_code
    except LinkClosed as e:
        result.action = "incomplete" if result.action in ("none",) else result.action
        result.error, result.exit_code = f"the link dropped ({e})", 1
    finally:
        if store is not None:
            try:
                result.n_steps, result.head = store.head()
            except LedgerError:
                pass
            store.close()
        result.bytes_in, result.bytes_out = chan.bytes_in, chan.bytes_out
        result.stats.update(chan.stats())
        result.seconds = time.monotonic() - t0
    return result, None


def serve(listener, ledger: str | Path | Callable[[], str | Path | None], run_id: str | None = None,
          opts: Options | None = None, once: bool = False, on_session: Callable[[Result], None] | None = None,
          stop: Callable[[], bool] | None = None, readonly: bool = False) -> Result | None:
    """Answer clients one after another (qes-edge sync serve): on TCP each connection is a
    session; on a serial line sessions follow one another on the open device."""
    opts = opts or Options()
    finished: set = set()
    pending = None
    last = None
    while stop is None or not stop():
        link = listener.accept(timeout=opts.slice * 4)
        if link is None:
            continue
        try:
            hello_wait = None if listener.is_serial else opts.timeout * (opts.retries + 1)
            result, pending = serve_session(link, ledger, run_id, opts, first=pending, finished=finished,
                                            idle=None, stop=stop, hello_wait=hello_wait, readonly=readonly)
        except LinkClosed as e:
            if listener.is_serial:
                raise Incomplete(f"{listener.url}: {e}") from None
            result = Result(action="incomplete", error=str(e), exit_code=1, peer=link.name)
        if not listener.is_serial:
            link.close()
        if result.action == "ended" and stop is not None and stop():
            break
        last = result
        if on_session is not None:
            on_session(result)
        if once:
            return result
    return last
