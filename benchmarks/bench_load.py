"""One training step's time on an idle machine and next to busy processes, per OpenMP wait policy.

llama.cpp's OpenMP threads spin while they wait (OMP_WAIT_POLICY=ACTIVE, or libgomp's default
spin-then-sleep): on a machine that is busy with anything else the spinning threads steal the
cores their own partners need.  qes-edge sets PASSIVE (qes_edge/threads.py).  This measures, in
one run, the median wall time of Trainer.step() of the default model (SmolLM2-135M Q4_1,
sentiment task) with 0, 1 and 2 busy background processes, for each policy and each thread
count, as ratios to the idle time of the same policy and threads and to the PASSIVE idle time.
The goal (the issue's): at most 2x the idle step with 2 busy processes on 2 cores, a fair share.

Design.  libgomp reads OMP_WAIT_POLICY once, when llama.cpp is loaded, so each (policy, threads)
runs in its own child process (this script with --child) started with that policy in its
environment.  The child opens a session (qes_edge/training/session.py, threads=T: llama.cpp's n_threads and
libqes's threads) on a throwaway ledger in a temp dir, which loads the model once; it fills the
trainer's history with a full replay window of random history (as bench_overhead.py does, so the
update replays K steps from the first one), does one warm-up step, says "ready", then runs one
step per "step" line on its stdin and answers "done <seconds> <the step's timings as JSON>"
(forward passes, perturb, restore, update).  The parent starts the busy processes for each load,
sends the steps, reads the answers with a timeout, and stops the busy processes in a finally.  A busy process is a plain
Python loop that ends by itself after a hard time limit, or as soon as its parent is gone, so
none outlives the benchmark even if it is killed.  A step that does not finish within --timeout
seconds ends the measurement: the row reads "> X s" (a lower bound), the child is killed, and
heavier loads of the same policy and threads are not run (they are reported as "> X s" too,
marked not run).

    python benchmarks/bench_load.py [--policies PASSIVE,ACTIVE] [--threads 1,2] [--loads 0,1,2]
        [--steps 3] [--population 4] [--batch 8] [--window 50] [--timeout 60]

Run it on an otherwise quiet machine: the idle rows are the reference of every ratio.  The defaults
(2 policies x 2 thread counts x 3 loads, 3 steps each) take about 5 minutes on 2 cores, at most
about 10 when ACTIVE's spinning threads hit the timeout on both loaded rows.

Writes benchmarks/results/load.json (with nproc, the load average at start and the command)."""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL = 2.0  # at most 2x the idle step with busy processes (fair share of 2 cores among 2 + 2 threads)

# A busy process: burns one core in pure Python until its time limit, or until its parent (the
# benchmark) is gone, whichever comes first.  It needs nothing but the interpreter.
BUSY_CODE = """
import os, sys, time
limit, parent = float(sys.argv[1]), int(sys.argv[2])
end = time.monotonic() + limit
x = 0
while True:
    for _ in range(200000):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    if time.monotonic() > end or os.getppid() != parent:
        break
"""


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _policies(s: str) -> list[str]:
    out = [x.strip().upper() for x in s.split(",") if x.strip()]
    bad = [p for p in out if p not in ("PASSIVE", "ACTIVE")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown OpenMP wait policy {bad[0]!r} (PASSIVE or ACTIVE)")
    return out


# ---------------------------------------------------------------------------------------- child

def child(a) -> int:
    """Load the model once with this process's wait policy, then run steps on command."""
    # the protocol gets its own copy of stdout; fd 1 goes to stderr, so nothing that llama.cpp
    # or a library prints can corrupt it
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(*words):
        proto.write(" ".join(str(w) for w in words) + "\n")
        proto.flush()

    try:
        import numpy as np

        from qes_edge.native.engine import random_steps
        from qes_edge.ledger.store import StepRecord
        from qes_edge.training.session import Session, SessionOptions
        from qes_edge.threads import wait_policy
        from qes_edge.training.config import TrainConfig

        cfg = TrainConfig(task="sentiment", population=a.population, batch=a.batch, window=a.window, n_ctx=256)
        # the parent's temp dir (removed by the parent even when it has to kill this process)
        with tempfile.TemporaryDirectory(prefix="ledger-", dir=a.tmp) as d:
            t0 = time.perf_counter()
            # the default model, llama.cpp's and libqes's threads a.n_threads
            session = Session.open(SessionOptions(cfg, ledger=Path(d) / "load.qes", threads=a.n_threads))
            load_s = time.perf_counter() - t0  # the session's opening: checks, model load, prompts
            with session:  # closed (its ledger too) however the child ends
                lg, tr = session.ledger, session.trainer
                lg.append_step = lambda run_id, rec: rec  # the history is synthetic: keep the ledger out of it
                rng = np.random.default_rng(0)
                for k, st in enumerate(random_steps(rng, a.window, a.population, cfg.sigma, cfg.alpha)):
                    tr.history.append(StepRecord(k - a.window, st.threshold, st.seeds, st.coefs_q16,
                                                 np.zeros(a.population), ""))
                window = list(tr.history)

                def one_step() -> tuple[float, dict]:
                    tr.replica.history = list(window)  # the same step number, batch and replay window every time
                    t = time.perf_counter()
                    rec = tr.step()
                    return time.perf_counter() - t, rec.timings

                warm, _ = one_step()
                say("ready", json.dumps({"load_s": round(load_s, 3), "warmup_s": round(warm, 3),
                                         "wait_policy": wait_policy(), "n_threads": a.n_threads,
                                         "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}))
                for line in sys.stdin:
                    cmd = line.strip()
                    if cmd == "step":
                        wall, parts = one_step()
                        say("done", f"{wall:.6f}", json.dumps(parts))
                    elif cmd == "quit":
                        break
                    elif cmd:
                        say("error", f"unknown command {cmd!r}")
        return 0
    except BaseException as e:  # noqa: BLE001  tell the parent why, then fail
        say("error", json.dumps(f"{type(e).__name__}: {e}"))
        raise


# --------------------------------------------------------------------------------------- parent

class ChildTimeout(Exception):
    pass


class Child:
    """A --child process and its line protocol (stdout read with a timeout; stderr to a file)."""

    def __init__(self, a, policy: str, threads: int, log_dir: Path):
        env = dict(os.environ, OMP_WAIT_POLICY=policy, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--policy", policy,
               "--n-threads", str(threads), "--population", str(a.population), "--batch", str(a.batch),
               "--window", str(a.window), "--tmp", str(log_dir)]
        self.log = log_dir / f"child-{policy}-{threads}.log"
        self._err = open(self.log, "wb")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                  env=env, cwd=str(HERE.parent))
        self._buf = b""

    def send(self, line: str) -> None:
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def read(self, timeout: float) -> tuple[str, str]:
        """The child's next line as (word, rest); ChildTimeout after timeout seconds."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildTimeout()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.p.wait()
                raise RuntimeError(f"the child ({self.log.name}) exited with {self.p.returncode}:\n"
                                   + self.stderr_tail())
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        word, _, rest = line.decode(errors="replace").strip().partition(" ")
        if word == "error":
            raise RuntimeError(f"the child failed: {rest}\n{self.stderr_tail()}")
        return word, rest

    def stderr_tail(self, n: int = 3000) -> str:
        self._err.flush()
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self._err):
            try:
                f.close()
            except OSError:
                pass


class Busy:
    """n busy processes, each with a hard time limit; stop() kills whatever is left."""

    def __init__(self, n: int, limit_s: float):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE, f"{limit_s:.0f}", str(os.getpid())],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                      for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def measure(a, policy: str, threads: int, log_dir: Path) -> tuple[dict, list[dict]]:
    """The rows of one (policy, threads): one child, every load in turn."""
    info: dict = {"policy": policy, "threads": threads}
    rows: list[dict] = []
    ch = Child(a, policy, threads, log_dir)
    try:
        t0 = time.monotonic()
        try:
            word, rest = ch.read(a.load_timeout)
        except ChildTimeout:
            info["error"] = f"not ready within {a.load_timeout:.0f} s (load + warm-up step)"
            print(f"  {policy} T={threads}: {info['error']}", flush=True)
            return info, [{"policy": policy, "threads": threads, "load": n, "median_s": None, "steps_s": [],
                           "exceeded": True, "not_run": True, "timeout_s": a.timeout} for n in a.loads]
        info.update(json.loads(rest), ready_after_s=round(time.monotonic() - t0, 3))
        print(f"  {policy} T={threads}: loaded in {info['load_s']:.1f} s, warm-up step {info['warmup_s']:.2f} s "
              f"[{info['wait_policy']}]", flush=True)
        exceeded = None
        for n in a.loads:
            row = {"policy": policy, "threads": threads, "load": n, "steps_s": [], "timeout_s": a.timeout,
                   "loadavg_before": round(os.getloadavg()[0], 2)}
            rows.append(row)
            if exceeded is not None:
                row.update(median_s=None, exceeded=True, not_run=True)
                print(f"  {policy} T={threads} load {n}: not run (load {exceeded} exceeded {a.timeout:.0f} s)",
                      flush=True)
                continue
            busy = Busy(n, limit_s=a.steps * a.timeout + 60) if n else None
            try:
                if busy:
                    time.sleep(a.settle)  # let the busy processes get going
                for _ in range(a.steps):
                    ch.send("step")
                    try:
                        word, rest = ch.read(a.timeout)
                    except ChildTimeout:
                        row.update(median_s=None, exceeded=True)
                        exceeded = n
                        ch.p.kill()  # mid-step: it cannot be interrupted more gently
                        break
                    wall, _, parts = rest.partition(" ")
                    row["steps_s"].append(round(float(wall), 4))
                    row.setdefault("parts", []).append(json.loads(parts) if parts else {})
            finally:
                if busy:
                    busy.stop()
            if not row.get("exceeded"):
                row.update(median_s=round(_median(row["steps_s"]), 4), exceeded=False)
                print(f"  {policy} T={threads} load {n}: median {row['median_s']:.2f} s of {row['steps_s']}",
                      flush=True)
            else:
                print(f"  {policy} T={threads} load {n}: > {a.timeout:.0f} s (a step exceeded the timeout; "
                      f"finished steps {row['steps_s']})", flush=True)
        return info, rows
    finally:
        ch.close()


def _fmt_s(r: dict) -> str:
    if r.get("median_s") is None:
        return f"> {r['timeout_s']:.0f} s" + (" (not run)" if r.get("not_run") else "")
    return f"{r['median_s']:.2f} s"


def _ratio(r: dict, base: dict | None) -> tuple[float | None, str]:
    """(ratio, text): a lower bound '> x' where the row exceeded its timeout."""
    if base is None or base.get("median_s") is None:
        return None, "-"
    if r.get("median_s") is None:
        lb = r["timeout_s"] / base["median_s"]
        return None, f"> {lb:.1f}x"
    x = r["median_s"] / base["median_s"]
    return x, f"{x:.2f}x"


def report(rows: list[dict]) -> None:
    idle = {(r["policy"], r["threads"]): r for r in rows if r["load"] == 0}
    head = f"{'policy':8} {'T':>2} {'busy':>4} {'median step':>20} {'/ own idle':>11} {'/ PASSIVE idle':>15}  goal <= {GOAL:g}x"
    print(head)
    print("-" * len(head))
    for r in rows:
        x, own = _ratio(r, idle.get((r["policy"], r["threads"])))
        xp, pas = _ratio(r, idle.get(("PASSIVE", r["threads"])))
        if r["load"] == 0:
            meets = ""
        elif x is not None:
            meets = "meets" if x <= GOAL else "MISSES"
        else:
            meets = "MISSES" if own.startswith(">") and float(own[2:-1]) > GOAL else "unknown"
        r.update(ratio_to_idle=None if x is None else round(x, 3), ratio_to_idle_text=own,
                 ratio_to_passive_idle=None if xp is None else round(xp, 3), ratio_to_passive_idle_text=pas,
                 goal=meets or None)
        print(f"{r['policy']:8} {r['threads']:>2} {r['load']:>4} {_fmt_s(r):>20} {own:>11} {pas:>15}  {meets}")


def parent(a) -> int:
    start = {"nproc": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
             "loadavg_start": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
             "command": shlex.join(["python", *sys.argv]),
             "config": {"population": a.population, "batch": a.batch, "window": a.window, "steps": a.steps,
                        "timeout_s": a.timeout, "task": "sentiment", "policies": a.policies, "threads": a.threads,
                        "loads": a.loads}}
    print(f"bench_load: {start['nproc']} cores, load average {start['loadavg_start']}; population {a.population}, "
          f"batch {a.batch}, window {a.window}, {a.steps} steps per row, timeout {a.timeout:.0f} s per step",
          flush=True)
    t0 = time.monotonic()
    rows: list[dict] = []
    children: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qes-bench-load-logs-") as d:
        for policy in a.policies:
            for threads in a.threads:
                info, r = measure(a, policy, threads, Path(d))
                children.append(info)
                rows.extend(r)
    print()
    report(rows)
    total = time.monotonic() - t0
    print(f"\n{total / 60:.1f} min; 'goal' compares each loaded row with its own policy/threads idle step.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({**start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                                 "duration_s": round(total, 1), "goal_ratio": GOAL, "children": children,
                                 "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", type=_policies, default=["PASSIVE", "ACTIVE"], help="comma-separated")
    ap.add_argument("--threads", type=_ints, default=[1, 2], help="llama.cpp and libqes threads, comma-separated")
    ap.add_argument("--loads", type=_ints, default=[0, 1, 2], help="busy background processes, comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per row (their median is reported)")
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one step may take before the row is '> X s'")
    ap.add_argument("--load-timeout", type=float, default=300.0, help="seconds for a child to load and warm up")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds the busy processes run before the first step")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "load.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--n-threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    if sorted(set(a.loads)) != a.loads or a.loads[0] != 0:
        ap.error("--loads must start with 0 (the idle step every ratio is taken to) and increase")
    if a.steps < 1 or a.population < 2 or a.population % 2 or min(a.threads) < 1:
        ap.error("--steps >= 1, --population even >= 2, --threads >= 1")
    # Ctrl-C / SIGTERM: the finally clauses stop the busy processes and the children
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return parent(a)


if __name__ == "__main__":
    sys.exit(main())
