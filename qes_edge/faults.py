"""Named crash points, for the tests that kill the daemon at exact moments.

`QES_EDGE_CRASH_AT=point:n` makes this process kill itself with SIGKILL the n-th time (1-based)
it reaches `point`, exactly as `kill -9` from outside would at that moment;
`point:n:TERM` sends SIGTERM instead (a stop request that arrives at that moment).  The points are
where a crash matters: `member` (weights perturbed, mid-evaluation), `update` (codes half
updated), `ledger-write` (the step row inserted, its transaction not committed).  Unset (every
normal run), :func:`point` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC: tuple[str, int, int] | None = None
_COUNT = 0


def _parse(value: str | None) -> tuple[str, int, int] | None:
    if not value:
        return None
    parts = value.split(":")
    name, n, sig = parts[0], parts[1] if len(parts) > 1 else "1", parts[2] if len(parts) > 2 else "KILL"
    return name, int(n), int(getattr(signal, f"SIG{sig}"))


_SPEC = _parse(os.environ.get("QES_EDGE_CRASH_AT"))


def point(name: str) -> None:
    global _COUNT
    if _SPEC is None or _SPEC[0] != name:
        return
    _COUNT += 1
    if _COUNT == _SPEC[1]:
        os.kill(os.getpid(), _SPEC[2])
