"""The shared population: a step's members evaluated on this process and on peer devices
(docs/sync-protocol.md §9).

The coordinator (`qes-edge train --peers URL[,URL]`) owns the ledger and the update.  For each step
it splits the members, mirrored pairs together, between itself and its peers; sends each peer the
ledger rows it lacks (type 6, as sync does) and an *evaluate* (type 16: step, member indices and
seeds, batch ids, the head the step starts from); evaluates its own share meanwhile; then collects
the *rewards* (type 17) by member index.  A peer that hangs up, times out, refuses or answers for
another head has its members evaluated here: a step is never recorded with a reward missing, and
the rewards are the ones one process would have computed (llama.cpp scores are bit-identical across
processes with the same --threads), so the ledger equals a one-process run's.

A worker (`qes-edge worker --on URL --ledger L`) holds the model and its own copy of the run's
ledger.  Each step row it receives is appended with its chain checked (`append_received`) and
applied to its replica (`Replica.apply`), which checks the weights hash: before it evaluates step k it
holds exactly the weights after step k-1, the coordinator's, and every device applies the identical
update.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qes_edge.ledger.store import Ledger, LedgerError
from qes_edge.sync import messages as M
from qes_edge.sync.link import Link, LinkClosed
from qes_edge.sync.messages import MessageError, T
from qes_edge.training.executors.local import Evaluation, Gathered, LocalExecutor, StepAbandoned
from qes_edge.training.replica import Replica


def placement_mismatch(coordinator: int, worker: int, who: str) -> str:
    """The refusal of a worker whose --gpu-layers differs from the coordinator's: a GPU's rewards
    differ from the CPU's in their last bits, so the ledger would depend on who scored which member."""
    from qes_edge.llama.placement import describe_gpu_layers as d
    return (f"the coordinator runs --gpu-layers {d(coordinator)}, {who} --gpu-layers {d(worker)}: rewards computed "
            "on a GPU differ from the CPU's in their last bits, so every process of a population must place the "
            "model alike (give the worker the coordinator's --gpu-layers)")


def split_members(n: int, parts: int) -> list[np.ndarray]:
    """Member indices 0..n-1 in `parts` contiguous shares of whole mirrored pairs, the first shares
    one pair larger when the pairs do not divide evenly (a share may be empty)."""
    pairs = n // 2
    sizes = [pairs // parts + (1 if i < pairs % parts else 0) for i in range(parts)]
    out, start = [], 0
    for s in sizes:
        out.append(np.arange(2 * start, 2 * (start + s)))
        start += s
    return out


def _channel(link: Link, session: int | None, role: str, timeout: float | None = None):
    """A sync channel with sync's options (a frame's timeout: Options.timeout unless given)."""
    from qes_edge.sync.session import Channel, Options
    return Channel(link, Options() if timeout is None else Options(timeout=timeout), session, role)


def _node() -> str:
    return f"{random.getrandbits(64):016x}"


class PeerRefused(Exception):
    """A peer that cannot share this run (another base model, a forked ledger, an error it sent)."""


class PeerBehind(Exception):
    """A peer that lacked a step row (a frame lost on the line): it stays, and the next request
    carries the rows from its head."""


# -- the coordinator's side --------------------------------------------------------------------

@dataclass
class Peer:
    """One worker as the coordinator sees it: its channel, its step count and head."""
    link: Link
    name: str
    chan: object = None
    n_steps: int = 0
    head: str | None = None
    alive: bool = True
    why: str = ""
    members: int = 0          # members it evaluated (statistics)
    fallbacks: int = 0        # requests whose members were evaluated here instead


class PeerExecutor:
    """Members split between this process (`local`, a LocalExecutor) and `peers` (links to
    workers).  Bind it to the run (:meth:`bind`) before the first step: the handshake checks each
    peer holds the same run (or none) on a chain that is a prefix of ours."""

    def __init__(self, local: LocalExecutor, links: Sequence[Link], *, timeout: float = 600.0,
                 hello_timeout: float = 300.0, say: Callable[[str], None] = lambda m: None):
        self.local = local
        self.peers = [Peer(link, getattr(link, "name", "?")) for link in links]
        self.timeout, self.hello_timeout, self.say = timeout, hello_timeout, say
        self.ledger: Ledger | None = None
        self.run_id: str | None = None
        self.req = 0
        self.node = _node()

    @classmethod
    def for_session(cls, session, links: Sequence[Link], **kw) -> "PeerExecutor":
        ex = cls(session.trainer.executor, links, say=session.say, **kw)
        ex.bind(session.ledger, session.run.run_id)
        return ex

    # -- the run --------------------------------------------------------------------------------
    def _head(self) -> tuple[int, str]:
        last = self.ledger.last_step(self.run_id)
        return (0, self.ledger.run(self.run_id).hash) if last is None else (last.step + 1, last.hash)

    def bind(self, ledger: Ledger, run_id: str) -> None:
        """Say hello to every peer; a peer that refuses or cannot be reached is left out (said)."""
        from qes_edge.sync.session import Options
        self.ledger, self.run_id = ledger, run_id
        n, head = self._head()
        opts = Options()
        mine = M.Hello(M.PROTOCOL, opts.version(), self.node, "client", opts.noise_spec(), ledger.export_run(run_id),
                       n, head, gpu_layers=getattr(self.local.driver, "gpu_layers", 0))
        for p in self.peers:
            p.chan = _channel(p.link, random.getrandbits(32), "client")
            try:
                p.chan.send(T.HELLO, M.encode_json(mine.to_json()))
                f = self._wait(p, {T.HELLO}, self.hello_timeout)
                peer = M.decode_hello(f.payload)
                from qes_edge.sync.session import Refused, compare
                try:
                    compare(mine, peer)
                except Refused as e:
                    raise PeerRefused(str(e)) from None
                if peer.gpu_layers is not None and peer.gpu_layers != mine.gpu_layers:
                    raise PeerRefused(placement_mismatch(mine.gpu_layers, peer.gpu_layers, "it"))
                if peer.n_steps > n or (peer.n_steps and ledger.step_hashes(run_id, [peer.n_steps - 1]).get(
                        peer.n_steps - 1) != peer.head):
                    raise PeerRefused(f"its ledger holds {peer.n_steps} steps of the run ending in "
                                      f"{(peer.head or '')[:16]}…, not a prefix of this one ({n} steps): move its "
                                      "ledger aside")
                p.n_steps, p.head = peer.n_steps, peer.head
                self.say(f"peer {p.name}: run {run_id[:8]} at step {p.n_steps}, sharing the population")
            except (PeerRefused, LinkClosed, MessageError, TimeoutError) as e:
                self._drop(p, f"{e}")

    def _drop(self, p: Peer, why: str) -> None:
        if p.alive:
            self.say(f"peer {p.name} left out: {why}; its members are evaluated here")
        p.alive, p.why = False, why
        try:
            p.link.close()
        except Exception:  # pragma: no cover - closing a dead link
            pass

    def _wait(self, p: Peer, types: set, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            f = p.chan.recv(min(left, 1.0))
            if f is None:
                continue
            if f.type == T.ERROR:
                try:
                    err = M.decode_error(f.payload)
                except MessageError as e:
                    raise PeerRefused(f"an error that cannot be decoded ({e})") from None
                raise PeerRefused(err["message"])
            if f.type in types:
                return f

    @property
    def alive(self) -> list[Peer]:
        return [p for p in self.peers if p.alive]

    # -- a step ---------------------------------------------------------------------------------
    def _send(self, p: Peer, step: int, idx: np.ndarray, seeds, batch_ids, head: str) -> None:
        if p.n_steps < step:  # the rows it lacks, as sync streams them
            times = self.ledger.step_times(self.run_id, p.n_steps, step)
            for rec in self.ledger.steps(self.run_id, p.n_steps, step):
                p.chan.send(T.STEP, M.encode_step(rec, times.get(rec.step)))
        p.chan.send(T.EVALUATE, M.evaluate(M.Evaluate(self.req, step, [int(i) for i in idx],
                                                      [int(seeds[i]) for i in idx], [int(b) for b in batch_ids],
                                                      step, head)))

    def _collect(self, p: Peer, step: int, idx: np.ndarray, deadline: float) -> M.Rewards:
        while True:
            f = self._wait(p, {T.REWARDS}, max(0.001, deadline - time.monotonic()))
            r = M.decode_rewards(f.payload)
            if r.req != self.req:
                continue  # a late answer to an abandoned request
            p.n_steps, p.head = r.n_steps, r.head
            if r.behind:
                raise PeerBehind(f"it holds {r.n_steps} steps, not the {step} step {step} starts from")
            if r.step != step or r.members != [int(i) for i in idx]:
                raise PeerRefused("it answered for other members")
            return r

    def evaluate(self, step: int, seeds: np.ndarray, batch_ids: np.ndarray) -> Evaluation:
        n_done, head = self._head()
        if n_done != step:
            raise RuntimeError(f"step {step} asked of a shared population whose ledger holds {n_done} steps")
        self.req += 1
        peers = self.alive
        shares = split_members(len(seeds), 1 + len(peers))
        sent: list[tuple[Peer, np.ndarray]] = []
        here = [shares[0]]
        for p, idx in zip(peers, shares[1:]):
            if not len(idx):
                continue
            try:
                self._send(p, step, idx, seeds, batch_ids, head)
                sent.append((p, idx))
            except LinkClosed as e:
                self._drop(p, str(e))
                here.append(idx)
        got = Gathered(len(seeds))
        batch = [self.local.examples[i] for i in batch_ids]
        def stop(k):
            if self.local.should_stop is not None and self.local.should_stop():
                raise StepAbandoned(f"step {step} abandoned with members still to evaluate")

        def run_here(idx):
            got.add_members(idx, self.local.evaluate_members(idx, seeds[idx], batch, stop))

        for idx in here:
            run_here(idx)
        t0 = time.perf_counter()
        remote = 0
        deadline = time.monotonic() + self.timeout
        for p, idx in sent:
            try:
                r = self._collect(p, step, idx, deadline)
            except (PeerRefused, PeerBehind, LinkClosed, MessageError, TimeoutError) as e:
                if isinstance(e, (TimeoutError, PeerBehind)):
                    self._late(p, e)
                else:
                    self._drop(p, str(e))
                p.fallbacks += 1
                run_here(idx)
                continue
            fails: dict[int, str] = {}
            for line in r.failures:
                i = int(line.split()[1]) if line.startswith("member ") else None
                fails[i if i is not None else -1 - len(got.failures) - len(fails)] = line
            got.add(idx, r.rewards, fails, r.timings, r.parts)
            remote += len(idx)
            p.members += len(idx)
        return got.evaluation(peer_wait_s=time.perf_counter() - t0, remote_members=remote)

    def _late(self, p: Peer, e: Exception) -> None:
        # a peer that is only slow keeps its place: its late answer is dropped by the request number
        self.say(f"peer {p.name}: {e}; its members were evaluated here")

    def close(self) -> None:
        for p in self.peers:
            if p.alive and p.chan is not None:
                try:
                    n, head = self._head() if self.ledger is not None else (0, None)
                    p.chan.send(T.BYE, M.bye(n, head, False))
                except (LinkClosed, LedgerError):
                    pass
            p.link.close()
        self.local.close()


# -- the worker's side -------------------------------------------------------------------------

@dataclass
class WorkerRun:
    """A run as a worker holds it: its ledger, the model at the ledger's head, the evaluator."""
    ledger: Ledger
    run_id: str
    replica: Replica
    executor: LocalExecutor
    evaluated: int = 0
    notes: list = field(default_factory=list)

    def head(self) -> tuple[int, str]:
        if self.replica.history:
            return self.replica.steps, self.replica.history[-1].hash
        return 0, self.ledger.run(self.run_id).hash

    def apply(self, rec, created) -> None:
        n, _ = self.head()
        if rec.step < n:
            return  # a row sent again: held already
        self.ledger.append_received(self.run_id, rec, created)
        self.replica.apply(rec)


#: opens (driver, task, threads) for a run's export (the CLI: the model checked against the run's
#: base sha256, the task from its recorded config; the tests: a toy model)
Opener = Callable[[dict], tuple]


class Worker:
    """Evaluates members for coordinators, one link at a time, keeping the run it was last asked
    about loaded between links."""

    def __init__(self, ledger_path: str | Path, opener: Opener, say: Callable[[str], None] = lambda m: None):
        self.ledger_path = Path(ledger_path)
        self.opener, self.say = opener, say
        self.run: WorkerRun | None = None
        self.node = _node()

    def _open(self, info: dict) -> WorkerRun:
        from qes_edge.native.engine import TensorGroup, sigma_threshold
        from qes_edge.training.config import TrainConfig
        import json
        if self.run is not None and self.run.run_id == info["run_id"]:
            return self.run
        if self.run is not None:
            self.run.ledger.close()
            self.run = None
        driver, task, threads = self.opener(info)  # refuses a foreign base before the ledger is touched
        lg = Ledger(self.ledger_path)
        try:
            run = lg.import_run(info)
            cfg = TrainConfig.from_record(json.loads(run.config) if isinstance(run.config, str) else run.config)
            replica = Replica(driver.tensors, cfg, threads)
            replica.catch_up(lg.steps(run.run_id))  # from this worker's own ledger
            local = LocalExecutor(driver, task, TensorGroup(driver.tensors, threads), sigma_threshold(cfg.sigma))
        except BaseException:
            lg.close()
            raise
        self.run = WorkerRun(lg, run.run_id, replica, local)
        return self.run

    def close(self) -> None:
        if self.run is not None:
            self.run.ledger.close()
            self.run = None

    def serve_link(self, link: Link, stop: Callable[[], bool] = lambda: False, idle: float | None = None) -> str:
        """Answer one coordinator from its hello until it says bye or hangs up; returns why it ended."""
        from qes_edge.sync.session import Options, Refused, compare
        chan = _channel(link, None, "server")
        opts = Options()
        t_last = time.monotonic()
        f = None
        while f is None:
            if stop():
                return "stopped"
            f = chan.recv(0.5)
        chan.adopt(f)

        def refuse(code, msg):
            try:
                chan.send(T.ERROR, M.error(code, msg))
            except LinkClosed:
                pass
            return f"refused: {msg}"

        try:
            hello = M.decode_hello(f.payload)
        except MessageError as e:
            return refuse("protocol", f"a malformed hello ({e})")
        if hello.run is None and hello.protocol == M.PROTOCOL:
            return refuse("run", "the coordinator offers no run")
        try:  # the checks a sync makes: protocol, a looped-back link, the engines' and the run's noise spec
            compare(M.Hello(M.PROTOCOL, opts.version(), self.node, "server", opts.noise_spec(), None, 0, None), hello)
        except Refused as e:
            return refuse("refused", f"the worker refuses: {e}")
        mine = getattr(self.opener, "gpu_layers", 0)
        if hello.gpu_layers is not None and hello.gpu_layers != mine:
            return refuse("placement", "the worker refuses: " + placement_mismatch(hello.gpu_layers, mine, "this worker"))
        try:
            wr = self._open(hello.run)
        except Exception as e:  # a foreign base, a ledger of another chain, a model that will not load
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.say(f"refused {link.name}: {msg}")
            return refuse("worker", f"the worker cannot take run {hello.run['run_id'][:8]}: {msg}")
        n, head = wr.head()
        chan.send(T.HELLO, M.encode_json(M.Hello(M.PROTOCOL, opts.version(), self.node, "server", opts.noise_spec(),
                                                 wr.ledger.export_run(wr.run_id), n, head,
                                                 gpu_layers=mine).to_json()))
        self.say(f"coordinator {link.name}: run {wr.run_id[:8]}, this worker at step {n}")
        while True:
            try:
                f = chan.recv(0.5)
            except LinkClosed:
                return "the coordinator hung up"
            if f is None:
                if stop():
                    return "stopped"
                if idle is not None and time.monotonic() - t_last > idle:
                    return f"no request within {idle:.0f} s"
                continue
            t_last = time.monotonic()
            try:
                if f.type == T.STEP:
                    rec, created = M.decode_step(f.payload)
                    if rec.step > wr.head()[0]:
                        continue  # a row before it was lost: the evaluate will say we are behind
                    wr.apply(rec, created)
                elif f.type == T.EVALUATE:
                    chan.send(T.REWARDS, M.rewards(self._evaluate(wr, M.decode_evaluate(f.payload))))
                elif f.type == T.BYE:
                    return "bye"
                elif f.type == T.ERROR:
                    return "the coordinator ended with an error"
            except MessageError as e:
                return refuse("protocol", f"a malformed message of type {f.type} ({e})")
            except LedgerError as e:
                msg = str(e).splitlines()[0]
                self.say(f"refused {link.name}: {msg}")
                self.close()  # the weights may be half a step on: rebuild them from the ledger next time
                return refuse("ledger", msg)
            except LinkClosed:
                return "the coordinator hung up"

    def _evaluate(self, wr: WorkerRun, e: M.Evaluate) -> M.Rewards:
        n, head = wr.head()
        if n != e.n_steps or head != e.head:
            return M.Rewards(e.req, e.step, e.members, [], [], {}, n, head, behind=True)
        ex = wr.executor
        m = ex.evaluate_members(e.members, e.seeds, [ex.examples[i] for i in e.batch])
        wr.evaluated += len(m.rewards)
        return M.Rewards(e.req, e.step, e.members, m.rewards, list(m.failures.values()), m.timings,
                         n, head, parts=m.parts)

    def serve(self, listener, once: bool = False, stop: Callable[[], bool] = lambda: False) -> None:
        """Accept coordinators one after another (until stop(); after the first with `once`)."""
        while not stop():
            link = listener.accept(0.5)
            if link is None:
                continue
            try:
                why = self.serve_link(link, stop)
            finally:
                if not listener.is_serial:
                    link.close()
            self.say(f"coordinator {link.name}: {why}")
            if once:
                return
