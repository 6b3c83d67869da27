"""Follow mode: a replayed copy of a peer's run, kept current as its steps arrive
(`qes-edge follow`, docs/sync-protocol.md "Follow").

The follower keeps a ledger of its own (the sync session pulls into it: every step checked
against the hash chain and committed on its own), and holds the run's trainable codes in
memory: the base model's codes, then every step replayed onto them (a replica: `Replica.apply`
checks each step's weights hash).  After each batch of new steps the GGUF is rewritten
atomically (a temporary file beside it, fsync, rename, fsync of the folder): whoever loads it
gets a complete earlier or later version, never a half-written one.  Between batches it sleeps
`interval` seconds and runs one sync session again (polling: a new connection on TCP, a new
session on a serial line)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qes_edge.ledger.runlog import PHASES
from qes_edge.ledger.store import Ledger, LedgerError
from qes_edge.sync.defaults import DEFAULT_BAUD
from qes_edge.sync.link import LinkError, open_link
from qes_edge.sync.session import Incomplete, Options, PeerError, Refused, SyncError, sync
from qes_edge.training.replica import Replica

TRAIN_PARTS = PHASES  # the training time of a step: every phase it records


class FollowError(Exception):
    """Following stopped: exit_code 1 a step did not replay to its recorded weights (or the
    GGUF could not be written), 2 refused (a bad ledger, base or peer), like sync's."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def train_seconds(timings: dict | None) -> float | None:
    """A step's training time as its ledger row records it: perturb + eval + restore + update +
    digest (None when the row has none of them, as synthetic rows may)."""
    if not timings:
        return None
    parts = [timings.get(k) for k in TRAIN_PARTS]
    parts = [float(p) for p in parts if isinstance(p, (int, float))]
    return sum(parts) if parts else None


@dataclass
class StepTime:
    step: int
    replay_s: float
    train_s: float | None

    @property
    def ratio(self) -> float | None:
        return self.replay_s / self.train_s if self.train_s else None

    def to_json(self) -> dict:
        return {"step": self.step, "replay_s": round(self.replay_s, 6),
                "train_s": None if self.train_s is None else round(self.train_s, 6),
                "ratio": None if self.ratio is None else round(self.ratio, 5)}


@dataclass
class Batch:
    """One round: a sync, the steps it brought replayed, the GGUF written."""
    first: int | None = None
    last: int | None = None
    steps: list[StepTime] = field(default_factory=list)
    write_s: float = 0.0
    sync_s: float = 0.0
    head: str | None = None
    n_steps: int = 0
    sync_error: str | None = None

    def line(self, out: Path) -> str:
        if not self.steps:
            return f"up to date: {self.n_steps} steps; head {self.head}"
        rep = sum(s.replay_s for s in self.steps)
        trained = [s.train_s for s in self.steps if s.train_s]
        ratio = f", {100 * rep / sum(trained):.2f}% of their training time {sum(trained):.2f} s" if trained else ""
        return (f"steps {self.first}..{self.last} replayed in {rep:.3f} s{ratio}, every weights hash matched; "
                f"wrote {out} in {self.write_s:.2f} s; head {self.head}")


class Follower:
    """A run's weights, replayed from a local ledger onto the base model's codes in memory."""

    def __init__(self, ledger: Path, out: Path, base: str | None = None, run_id: str | None = None,
                 threads: int = 0, gpu_layers: int = 0, device: str = "cuda"):
        """gpu_layers: the layers whose tensors are held and updated in `device` memory (the ones
        llama.cpp would offload: placement.planned_on_gpu), the others on the host."""
        self.ledger, self.out, self.base, self.run_id = Path(ledger), Path(out), base, run_id
        self.threads = threads
        self.gpu_layers, self.device = gpu_layers, device
        self.run = None
        self.model = None
        self.tensors = None
        self.replica = None  # the run's weights as replayed so far (replica.py)
        self.n = 0  # steps replayed
        self.times: list[StepTime] = []

    def _open(self, lg: Ledger) -> None:
        """On the first step (or run) seen: the base model's codes and the update state."""
        from qes_edge.gguf.model import GGUFModel, file_sha256
        from qes_edge.gguf.models import ModelNotFound, run_base_model
        from qes_edge.training.config import TrainConfig
        runs = {r.run_id: r for r in lg.runs()}
        run = runs.get(self.run_id) if self.run_id else (lg.run() if runs else None)
        if run is None:
            return
        try:
            base_path = run_base_model(run, self.base)
        except (ModelNotFound, ValueError) as e:
            raise FollowError(str(e)) from None
        if file_sha256(base_path) != run.base_sha256:
            raise FollowError(f"{base_path} is not this run's base model (sha256 differs from "
                              f"{run.base_sha256[:16]}…)")
        cfg = TrainConfig.from_record(run.config)
        try:
            cfg.validate()
            self.model = GGUFModel(base_path)
            self.tensors = self._placed(self.model.code_tensors(tuple(cfg.frozen)))
        except Exception as e:  # noqa: BLE001 - one line, whatever the reader says
            raise FollowError(f"{self.ledger}: the recorded config is not usable with {base_path}: {e}") from None
        self.replica = Replica(self.tensors, cfg, self.threads)
        self.run, self.run_id = run, run.run_id

    def _placed(self, tensors):
        """The tensors of the offloaded layers moved to the device (each its own device memory)."""
        if not self.gpu_layers:
            return tensors
        from qes_edge.llama.placement import block_count, planned_on_gpu
        from qes_edge.native.engine import to_device
        n_layer = block_count(self.model.header.metadata)
        if n_layer is None:
            raise ValueError("the header has no block_count: where layers go cannot be told")
        return [to_device(t, self.device) if planned_on_gpu(t.name, n_layer, self.gpu_layers) else t for t in tensors]

    def advance(self, on_step: Callable[[StepTime], None] | None = None,
                stop: Callable[[], bool] | None = None) -> Batch:
        """Replay the steps the local ledger holds beyond those replayed; write the GGUF when any
        came (or when none was written yet).  A step whose weights hash differs stops following
        (FollowError, exit 1) with the GGUF of the last good batch left in place."""
        batch = Batch()
        if not self.ledger.exists():
            return batch
        try:
            lg = Ledger(self.ledger, readonly=True)
        except LedgerError as e:
            raise FollowError(str(e)) from None
        try:
            if self.run is None:
                self._open(lg)
                if self.run is None:
                    return batch
            for rec in lg.steps(self.run_id, self.n):
                if stop is not None and stop():
                    break
                t0 = time.perf_counter()
                try:
                    self.replica.apply(rec)
                except LedgerError as e:
                    raise FollowError(f"mismatch: {e}; {self.out} keeps step {self.n - 1}'s weights", 1) from None
                st = StepTime(rec.step, time.perf_counter() - t0, train_seconds(rec.timings))
                self.n += 1
                self.times.append(st)
                batch.steps.append(st)
                batch.first = rec.step if batch.first is None else batch.first
                batch.last = rec.step
                batch.head = rec.hash
                if on_step is not None:
                    on_step(st)
            batch.n_steps = self.n
            if batch.head is None:
                history = self.replica.history
                batch.head = history[-1].hash if history else lg.run(self.run_id).hash
        finally:
            lg.close()
        if batch.steps or not self.out.exists():
            t0 = time.perf_counter()
            try:
                self.model.write(self.tensors, self.out)
            except OSError as e:
                raise FollowError(f"cannot write {self.out}: {e.strerror or e} (the previous version is kept)",
                                  1) from None
            batch.write_s = time.perf_counter() - t0
        return batch

    def summary(self) -> dict:
        timed = [s for s in self.times if s.train_s]
        rep = sum(s.replay_s for s in timed)
        tr = sum(s.train_s for s in timed)
        return {"steps": self.n, "run_id": self.run_id, "replay_s": round(sum(s.replay_s for s in self.times), 6),
                "timed_steps": len(timed), "train_s": round(tr, 6),
                "ratio": round(rep / tr, 5) if tr else None,
                "max_ratio": max((round(s.ratio, 5) for s in timed), default=None)}


def follow(peer: str | Callable, ledger: Path, out: Path, base: str | None = None, run_id: str | None = None,
           interval: float = 5.0, once: bool = False, opts: Options | None = None, baudrate: int = DEFAULT_BAUD,
           threads: int = 0, gpu_layers: int = 0, stop: threading.Event | None = None,
           on_batch: Callable[[Batch], None] | None = None,
           on_step: Callable[[StepTime], None] | None = None,
           on_sync_error: Callable[[SyncError], None] | None = None) -> Follower:
    """Catch up with the peer, then (unless once) sync again every `interval` seconds until
    `stop` is set.  A failed link is reported through on_sync_error and tried again at the next
    round (with once it raises); what came before it is replayed and written.  A refusal or a
    fork raises SyncError; a step that does not replay raises FollowError."""
    opts = opts or Options()
    stop = stop or threading.Event()
    f = Follower(ledger, out, base, run_id, threads, gpu_layers)
    while not stop.is_set():
        t0 = time.monotonic()
        failed = None
        try:  # a peer that cannot be reached (not started yet, restarting) is waited for, unless once
            first = open_link(peer, baudrate) if isinstance(peer, str) else peer()
        except LinkError as e:
            if once:
                raise Refused(str(e)) from None
            if on_sync_error is not None:
                on_sync_error(Incomplete(f"{e}; trying again in {interval:g} s"))
            stop.wait(interval)
            continue
        links = [first]

        def connect():
            return links.pop() if links else (open_link(peer, baudrate) if isinstance(peer, str) else peer())
        connect.url = peer if isinstance(peer, str) else getattr(peer, "url", "the peer")
        try:
            res = sync(connect, ledger, f.run_id or run_id, opts, baudrate=baudrate)
            if f.run_id is None and res.run_id is not None:
                f.run_id = res.run_id
        except PeerError as e:
            if e.code != "unavailable" or once:
                raise
            if on_sync_error is not None:  # a daemon before its job's run exists: ask again later
                on_sync_error(Incomplete(f"{e}; asking again in {interval:g} s"))
            stop.wait(interval)
            continue
        except SyncError as e:
            if e.exit_code != 1:
                raise
            failed = e  # the link failed: what came is kept, replayed and written; try again later
            if on_sync_error is not None:
                on_sync_error(e)
        sync_s = time.monotonic() - t0
        b = f.advance(on_step, stop.is_set)
        b.sync_s, b.sync_error = sync_s, None if failed is None else str(failed)
        if once and failed is not None:
            raise failed
        if f.run is None and once:
            raise Refused("the peer offered no run to follow")
        if on_batch is not None and (b.steps or once or (failed is None and f.n == 0 and f.run is not None
                                                         and not f.times and b.write_s)):
            on_batch(b)
        if once:
            break
        stop.wait(interval)
    return f
