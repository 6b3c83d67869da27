"""How many threads qes-edge uses, and how llama.cpp's threads wait.

llama.cpp's CPU backend is built with OpenMP, whose worker threads spin while they wait for
work.  On a machine that is busy with anything else (a laptop in use overnight, a Jetson
running its own job) spinning threads steal the cores the other threads need: DESIGN.md
measured a 28-token forward pass at 10-26 s with spinning threads against 0.24-0.65 s with
``OMP_WAIT_POLICY=PASSIVE``.  libgomp reads the policy once, when it is loaded, so it must be
in the environment before llama.cpp is imported: importing :mod:`qes_edge` sets it (unless the
user chose one) and :func:`wait_policy` says which policy is in force and who chose it.

Threads: ``--threads N`` sets llama.cpp's ``n_threads`` (generation), ``n_threads_batch``
(prompt processing, which llama-cpp-python otherwise leaves at every core) and the threads of
libqes's perturb/restore/update.  The default, :func:`default_threads`, is every core this
process may run on (its CPU affinity, so taskset and cgroup cpusets are respected): with
passive waiting a thread that has nothing to do sleeps instead of spinning, so other programs
get their fair share of the cores (benchmarks/bench_load.py measures it), and on an idle machine
training runs at full speed.
"""

from __future__ import annotations

import os
import sys

_USER_POLICY = os.environ.get("OMP_WAIT_POLICY")
_LOADED_BEFORE = "llama_cpp" in sys.modules


def set_wait_policy() -> None:
    """Passive waiting for OpenMP threads unless the user set a policy (idempotent)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def wait_policy() -> str:
    """The OpenMP wait policy llama.cpp's threads use, and who set it, in words."""
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    if _LOADED_BEFORE:
        return (f"{policy} in the environment, but llama_cpp was imported before qes_edge: "
                "the policy in force is whatever the environment held then")
    who = "set by the user" if _USER_POLICY is not None else "qes-edge default"
    return f"{policy.upper()} (OMP_WAIT_POLICY, {who})"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    return available_cores()


def resolve_threads(threads: int | None) -> int:
    """0 or None: the default; otherwise the number asked for (>= 1)."""
    if threads is None or threads == 0:
        return default_threads()
    if threads < 0:
        raise ValueError(f"--threads must be 0 (all cores) or a positive number, got {threads}")
    return int(threads)


set_wait_policy()
