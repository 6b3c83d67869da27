"""The ledger's hash chain (docs/ledger-spec.md §2-3): the run row's hash, each step's canonical
bytes and hash, and the records they cover.  Every step row carries sha256(previous hash ||
canonical bytes of the row); the first step chains to the run row's hash."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import numpy as np

GENESIS = b"\0" * 32


def run_hash(run_id: str, base_sha256: str, base_name: str, config_text: str, noise_spec: int) -> str:
    """The run row's hash (docs/ledger-spec.md §2): what every step of the run chains to."""
    return chain_hash(GENESIS, run_id.encode(), bytes.fromhex(base_sha256), base_name.encode(), config_text.encode(),
              struct.pack("<q", noise_spec))


def row_blobs(rec: "StepRecord") -> tuple[bytes, bytes, bytes]:
    """A step's seeds, Q16 coefficients and rewards as the little-endian blobs the row stores."""
    return (np.ascontiguousarray(rec.seeds, "<i8").tobytes(), np.ascontiguousarray(rec.coefs_q16, "<i4").tobytes(),
            np.ascontiguousarray(rec.rewards, "<f8").tobytes())


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def chain_hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return h.hexdigest()


@dataclass
class StepRecord:
    step: int
    threshold: int
    seeds: np.ndarray           # int64
    coefs_q16: np.ndarray       # int32
    rewards: np.ndarray         # float64 per member (NaN where the reward failed)
    weights_sha256: str
    timings: dict = field(default_factory=dict)
    failures: int = 0
    hash: str = ""
    prev_hash: str = ""

    def payload(self, run_id: str) -> bytes:
        """Canonical bytes of everything the row records (the hash covers all of it)."""
        return b"".join([
            run_id.encode(), struct.pack("<qIq", self.step, self.threshold, self.failures),
            *row_blobs(self), bytes.fromhex(self.weights_sha256),
            canonical_json(self.timings).encode(),
        ])


@dataclass
class Run:
    run_id: str
    base_sha256: str
    base_name: str
    config: dict
    noise_spec: int
    hash: str
