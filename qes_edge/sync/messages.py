"""Messages: what a frame's payload means (docs/sync-protocol.md §3).

Control messages are canonical JSON objects (keys sorted, no spaces, ASCII); a step is a fixed
little-endian binary layout, because it is what crosses the wire a thousand times.  Every
decoder checks every field (type, range, hex digits) and raises :class:`MessageError` with what
is wrong; nothing a peer sends reaches the ledger undecoded.

Type numbers: 1 hello, 2 error, 3 hashes?, 4 hashes, 5 request, 6 step, 7 done, 8 pull, 9 bye.
16 (evaluate: step, seeds, batch ids) and 17 (rewards) are reserved for the shared-population
executor; 18-63 for later versions of this protocol.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from qes_edge.ledger.store import StepRecord, canonical_json

PROTOCOL = 1          # the message protocol; hello carries it first, whatever else changes
MAX_WINDOW = 1024     # steps one request may ask for
MAX_HASH_QUERY = 64   # steps one hashes? may name


class T(IntEnum):
    HELLO = 1
    ERROR = 2
    HASHES_Q = 3
    HASHES = 4
    REQUEST = 5
    STEP = 6
    DONE = 7
    PULL = 8
    BYE = 9
    EVALUATE = 16  # reserved: a population member to evaluate (step, seeds, batch ids)
    REWARDS = 17   # reserved: its rewards, failures and timings


class MessageError(ValueError):
    """A payload that does not decode as the message its type says."""


_HEX = frozenset("0123456789abcdef")


def _hex(v, n: int, what: str, null: bool = False):
    if v is None and null:
        return None
    if not (isinstance(v, str) and len(v) == n and set(v) <= _HEX):
        raise MessageError(f"{what} is not {n} lowercase hex digits")
    return v


def _int(v, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise MessageError(f"{what} is not an integer in [{lo}, {hi}]")
    return v


def _str(v, what: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise MessageError(f"{what} is not a string (of at most {limit} characters)")
    return v


I64 = 2**63 - 1


def encode_json(obj: dict) -> bytes:
    return canonical_json(obj).encode()


def decode_json(payload: bytes, what: str) -> dict:
    try:
        obj = json.loads(payload.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise MessageError(f"{what}: not a JSON object")
    return obj


def _fields(obj: dict, what: str, required: set[str]) -> None:
    missing = required - set(obj)
    if missing:
        raise MessageError(f"{what}: missing {sorted(missing)}")


# -- hello -------------------------------------------------------------------------------

@dataclass
class Hello:
    protocol: int
    software: str
    node: str                  # 16 hex digits, random per process: a link that echoes is detected
    role: str                  # "client" or "server"
    engine_noise_spec: int     # the noise spec this device's engine implements
    run: dict | None           # Ledger.export_run() of the run on offer, or None
    n_steps: int
    head: str | None           # hash of the last step (the run's hash with no step); None without a run
    want_run: str | None = None  # the run the client asks for when it holds none
    # a population's coordinator and workers: the layers each offloads to a GPU (-1: all), which
    # decides the rewards' last bits (llama/placement.py); None: not said (a sync, an older peer)
    gpu_layers: int | None = None

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "software": self.software, "node": self.node, "role": self.role,
                "engine_noise_spec": self.engine_noise_spec, "run": self.run, "n_steps": self.n_steps,
                "head": self.head, "want_run": self.want_run, "gpu_layers": self.gpu_layers}


def decode_hello(payload: bytes) -> Hello:
    obj = decode_json(payload, "hello")
    # `protocol` comes first and alone: a peer of another version is named, not misparsed
    proto = obj.get("protocol")
    if type(proto) is not int:
        raise MessageError("hello: no protocol version")
    if proto != PROTOCOL:
        return Hello(proto, str(obj.get("software", "?"))[:64], "", "", 0, None, 0, None)
    _fields(obj, "hello", {"software", "node", "role", "engine_noise_spec", "run", "n_steps", "head", "want_run"})
    run = obj["run"]
    if run is not None:
        if not isinstance(run, dict):
            raise MessageError("hello: run is not an object")
        _fields(run, "hello: run", {"run_id", "created", "base_sha256", "base_name", "config", "noise_spec", "hash"})
        _hex(run["run_id"], 32, "hello: run_id")
        _hex(run["base_sha256"], 64, "hello: base_sha256")
        _hex(run["hash"], 64, "hello: run hash")
        _str(run["base_name"], "hello: base_name", 1024)
        _str(run["config"], "hello: config", 512 * 1024)
        _int(run["noise_spec"], -I64 - 1, I64, "hello: noise_spec")
        if not (isinstance(run["created"], (int, float)) and not isinstance(run["created"], bool)):
            raise MessageError("hello: created is not a number")
    role = obj["role"]
    if role not in ("client", "server"):
        raise MessageError("hello: role is not client or server")
    n = _int(obj["n_steps"], 0, I64, "hello: n_steps")
    head = _hex(obj["head"], 64, "hello: head", null=True)
    if (run is None) != (head is None) or (run is None and n):
        raise MessageError("hello: a head without a run, or a run without a head")
    return Hello(proto, _str(obj["software"], "hello: software", 64), _hex(obj["node"], 16, "hello: node"), role,
                 _int(obj["engine_noise_spec"], 0, 2**31, "hello: engine_noise_spec"), run, n, head,
                 _hex(obj["want_run"], 32, "hello: want_run", null=True),
                 None if obj.get("gpu_layers") is None else _int(obj["gpu_layers"], -1, 2**31, "hello: gpu_layers"))


# -- the small control messages -------------------------------------------------------------

def error(code: str, message: str, **detail) -> bytes:
    return encode_json({"code": code, "message": message, "detail": detail})


def decode_error(payload: bytes) -> dict:
    obj = decode_json(payload, "error")
    _fields(obj, "error", {"code", "message"})
    detail = obj.get("detail", {})
    if not isinstance(detail, dict):
        raise MessageError("error: detail is not an object")
    return {"code": _str(obj["code"], "error: code", 64), "message": _str(obj["message"], "error: message"),
            "detail": detail}


def hashes_q(run_id: str, steps: list[int]) -> bytes:
    return encode_json({"run_id": run_id, "steps": steps})


def decode_hashes_q(payload: bytes) -> tuple[str, list[int]]:
    obj = decode_json(payload, "hashes?")
    _fields(obj, "hashes?", {"run_id", "steps"})
    steps = obj["steps"]
    if not isinstance(steps, list) or not 0 < len(steps) <= MAX_HASH_QUERY:
        raise MessageError(f"hashes?: steps is not a list of 1 to {MAX_HASH_QUERY} step numbers")
    return _hex(obj["run_id"], 32, "hashes?: run_id"), [_int(s, 0, I64, "hashes?: step") for s in steps]


def hashes(run_id: str, found: dict[int, str]) -> bytes:
    return encode_json({"run_id": run_id, "hashes": [[k, h] for k, h in sorted(found.items())]})


def decode_hashes(payload: bytes) -> tuple[str, dict[int, str]]:
    obj = decode_json(payload, "hashes")
    _fields(obj, "hashes", {"run_id", "hashes"})
    pairs = obj["hashes"]
    if not isinstance(pairs, list) or len(pairs) > MAX_HASH_QUERY:
        raise MessageError("hashes: not a list of [step, hash] pairs")
    out = {}
    for p in pairs:
        if not (isinstance(p, list) and len(p) == 2):
            raise MessageError("hashes: not a list of [step, hash] pairs")
        out[_int(p[0], 0, I64, "hashes: step")] = _hex(p[1], 64, "hashes: hash")
    return _hex(obj["run_id"], 32, "hashes: run_id"), out


@dataclass
class Request:
    run_id: str
    start: int     # the first step wanted: the requester's step count
    count: int
    head: str      # the requester's head: the hash of step start-1 (the run's hash when start is 0)


def request(r: Request) -> bytes:
    return encode_json({"run_id": r.run_id, "from": r.start, "count": r.count, "head": r.head})


def decode_request(payload: bytes) -> Request:
    obj = decode_json(payload, "request")
    _fields(obj, "request", {"run_id", "from", "count", "head"})
    return Request(_hex(obj["run_id"], 32, "request: run_id"), _int(obj["from"], 0, I64, "request: from"),
                   _int(obj["count"], 1, MAX_WINDOW, "request: count"), _hex(obj["head"], 64, "request: head"))


@dataclass
class Done:
    run_id: str
    start: int     # the request it answers: steps start .. end-1 were sent
    end: int
    n_steps: int   # the sender's head now (it may have grown since hello)
    head: str


def done(d: Done) -> bytes:
    return encode_json({"run_id": d.run_id, "from": d.start, "to": d.end, "n_steps": d.n_steps, "head": d.head})


def decode_done(payload: bytes) -> Done:
    obj = decode_json(payload, "done")
    _fields(obj, "done", {"run_id", "from", "to", "n_steps", "head"})
    d = Done(_hex(obj["run_id"], 32, "done: run_id"), _int(obj["from"], 0, I64, "done: from"),
             _int(obj["to"], 0, I64, "done: to"), _int(obj["n_steps"], 0, I64, "done: n_steps"),
             _hex(obj["head"], 64, "done: head"))
    if not d.start <= d.end <= d.n_steps:
        raise MessageError("done: from <= to <= n_steps does not hold")
    return d


def pull(run_id: str) -> bytes:
    return encode_json({"run_id": run_id})


def decode_pull(payload: bytes) -> str:
    obj = decode_json(payload, "pull")
    _fields(obj, "pull", {"run_id"})
    return _hex(obj["run_id"], 32, "pull: run_id")


def bye(n_steps: int, head: str | None, ack: bool) -> bytes:
    return encode_json({"n_steps": n_steps, "head": head, "ack": ack})


def decode_bye(payload: bytes) -> dict:
    obj = decode_json(payload, "bye")
    _fields(obj, "bye", {"n_steps", "head", "ack"})
    if not isinstance(obj["ack"], bool):
        raise MessageError("bye: ack is not true or false")
    return {"n_steps": _int(obj["n_steps"], 0, I64, "bye: n_steps"),
            "head": _hex(obj["head"], 64, "bye: head", null=True), "ack": obj["ack"]}


# -- a step: binary ----------------------------------------------------------------------------
#   <q step, I threshold, q failures, I members P, d created (NaN: unknown), I timings length
#   seeds P x <i8, coefs_q16 P x <i4, rewards P x <f8, weights_sha256 32, hash 32, timings (canonical JSON)

_STEP = struct.Struct("<qIqIdI")
MAX_MEMBERS = 1 << 16


def encode_step(rec: StepRecord, created: float | None) -> bytes:
    timings = canonical_json(rec.timings).encode()
    p = len(rec.seeds)
    return b"".join([
        _STEP.pack(rec.step, rec.threshold, rec.failures, p, math.nan if created is None else float(created),
                   len(timings)),
        np.ascontiguousarray(rec.seeds, "<i8").tobytes(), np.ascontiguousarray(rec.coefs_q16, "<i4").tobytes(),
        np.ascontiguousarray(rec.rewards, "<f8").tobytes(), bytes.fromhex(rec.weights_sha256),
        bytes.fromhex(rec.hash), timings])


def decode_step(payload: bytes) -> tuple[StepRecord, float | None]:
    if len(payload) < _STEP.size:
        raise MessageError(f"step: {len(payload)} bytes, shorter than its fixed part")
    step, threshold, failures, p, created, tlen = _STEP.unpack_from(payload)
    if step < 0 or not 0 < threshold < 2**32 or failures < 0 or not 0 < p <= MAX_MEMBERS:
        raise MessageError(f"step: step {step}, threshold {threshold}, failures {failures} or members {p} "
                           "out of range")
    want = _STEP.size + 20 * p + 64 + tlen
    if len(payload) != want:
        raise MessageError(f"step {step}: {len(payload)} bytes where its fields say {want}")
    o = _STEP.size
    seeds = np.frombuffer(payload, "<i8", p, o).astype(np.int64)
    o += 8 * p
    coefs = np.frombuffer(payload, "<i4", p, o).astype(np.int32)
    o += 4 * p
    rewards = np.frombuffer(payload, "<f8", p, o).astype(np.float64)
    o += 8 * p
    weights, h = payload[o:o + 32].hex(), payload[o + 32:o + 64].hex()
    try:
        timings = json.loads(payload[o + 64:].decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageError(f"step {step}: timings are not JSON") from None
    if not isinstance(timings, dict):
        raise MessageError(f"step {step}: timings are not a JSON object")
    try:
        canonical_json(timings)
    except (ValueError, TypeError):
        raise MessageError(f"step {step}: timings hold a value canonical JSON cannot carry (NaN, infinity)") from None
    rec = StepRecord(step=step, threshold=threshold, seeds=seeds, coefs_q16=coefs, rewards=rewards,
                     weights_sha256=weights, timings=timings, failures=failures, hash=h)
    return rec, (created if math.isfinite(created) else None)


# -- the shared population (types 16 and 17, docs/sync-protocol.md §9) ----------------------------
#   evaluate: {req, step, members (population indices), seeds, batch, n_steps, head}
#   rewards:  {req, step, members, rewards (null where it failed), failures, timings, n_steps, head,
#              behind (true: the worker does not hold steps 0..step-1, nothing was evaluated)}
# Rewards are floats in JSON (Python writes the shortest text that reads back to the same double,
# so they cross bit for bit); a failed member's NaN is null.

@dataclass
class Evaluate:
    req: int           # the coordinator's request number: a reply to an older request is dropped
    step: int
    members: list[int]  # indices into the step's population
    seeds: list[int]
    batch: list[int]    # indices into the task's training examples
    n_steps: int        # the step starts from steps 0..n_steps-1 (n_steps == step)
    head: str           # the hash of step n_steps-1 (the run's hash when n_steps is 0)


def evaluate(e: Evaluate) -> bytes:
    return encode_json({"req": e.req, "step": e.step, "members": e.members, "seeds": e.seeds, "batch": e.batch,
                        "n_steps": e.n_steps, "head": e.head})


def _int_list(v, lo: int, hi: int, what: str, limit: int = MAX_MEMBERS) -> list[int]:
    if not isinstance(v, list) or len(v) > limit:
        raise MessageError(f"{what} is not a list of at most {limit} integers")
    return [_int(x, lo, hi, what) for x in v]


def decode_evaluate(payload: bytes) -> Evaluate:
    obj = decode_json(payload, "evaluate")
    _fields(obj, "evaluate", {"req", "step", "members", "seeds", "batch", "n_steps", "head"})
    e = Evaluate(_int(obj["req"], 0, I64, "evaluate: req"), _int(obj["step"], 0, I64, "evaluate: step"),
                 _int_list(obj["members"], 0, MAX_MEMBERS, "evaluate: members"),
                 _int_list(obj["seeds"], -I64, I64, "evaluate: seeds"),
                 _int_list(obj["batch"], 0, I64, "evaluate: batch"), _int(obj["n_steps"], 0, I64, "evaluate: n_steps"),
                 _hex(obj["head"], 64, "evaluate: head"))
    if len(e.members) != len(e.seeds) or not e.seeds or not e.batch or 0 in e.seeds:
        raise MessageError("evaluate: members and seeds differ in length, or a seed is 0, or nothing to evaluate")
    if e.n_steps != e.step:
        raise MessageError("evaluate: n_steps is not the step")
    return e


@dataclass
class Rewards:
    req: int
    step: int
    members: list[int]
    rewards: list[float]       # NaN where the member failed
    failures: list[str]
    timings: dict
    n_steps: int               # the worker's step count and head after this request
    head: str
    behind: bool = False       # the worker lacked steps: nothing evaluated, rewards empty
    parts: list | None = None  # several --reward: per member {reward: batch mean} or null; absent: none


def rewards(r: Rewards) -> bytes:
    obj = {"req": r.req, "step": r.step, "members": r.members,
           "rewards": [None if math.isnan(x) else float(x) for x in r.rewards],
           "failures": r.failures, "timings": {k: float(v) for k, v in r.timings.items()},
           "n_steps": r.n_steps, "head": r.head, "behind": r.behind}
    if r.parts is not None:
        obj["parts"] = r.parts
    return encode_json(obj)


def _parts(value, n: int) -> list | None:
    """A rewards message's parts: one {name: finite number} or null per member."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise MessageError("rewards: parts is not a list of one entry per member")
    out = []
    for p in value:
        if p is None:
            out.append(None)
            continue
        if not isinstance(p, dict) or len(p) > 64 or not all(
                isinstance(k, str) and len(k) <= 512 and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) for k, v in p.items()):
            raise MessageError("rewards: a member's parts are not an object of finite numbers")
        out.append({k: float(v) for k, v in p.items()})
    return out


def decode_rewards(payload: bytes) -> Rewards:
    obj = decode_json(payload, "rewards")
    _fields(obj, "rewards", {"req", "step", "members", "rewards", "failures", "timings", "n_steps", "head", "behind"})
    vals = obj["rewards"]
    if not isinstance(vals, list) or len(vals) > MAX_MEMBERS:
        raise MessageError("rewards: rewards is not a list")
    out = []
    for v in vals:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            raise MessageError("rewards: a reward is not a finite number or null")
    fails = obj["failures"]
    if not isinstance(fails, list) or len(fails) > MAX_MEMBERS:
        raise MessageError("rewards: failures is not a list")
    timings = obj["timings"]
    if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in timings.values()):
        raise MessageError("rewards: timings is not an object of numbers")
    if not isinstance(obj["behind"], bool):
        raise MessageError("rewards: behind is not true or false")
    r = Rewards(_int(obj["req"], 0, I64, "rewards: req"), _int(obj["step"], 0, I64, "rewards: step"),
                _int_list(obj["members"], 0, MAX_MEMBERS, "rewards: members"), out,
                [_str(f, "rewards: failure") for f in fails], {str(k): float(v) for k, v in timings.items()},
                _int(obj["n_steps"], 0, I64, "rewards: n_steps"), _hex(obj["head"], 64, "rewards: head"),
                obj["behind"], _parts(obj.get("parts"), len(out)))
    if not r.behind and len(r.rewards) != len(r.members):
        raise MessageError("rewards: not one reward per member")
    return r
