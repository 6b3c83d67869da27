"""Engine benchmark on the whole default model (SmolLM2-135M-Instruct Q4_1), in one run:

  * perturb + restore of every trainable tensor, per population member: codes changed per
    second, and the time as a ratio to a memcpy of the same tensor bytes;
  * one seed-replay update at the paper's settings (population 30 as 15 mirrored pairs,
    K = 50 replayed steps + the applied one, sigma 0.01, alpha 0.001, beta 0.9), as a ratio
    to the same memcpy and to one forward pass of the real model through llama-cpp-python.

    python benchmarks/bench_engine.py [--threads N] [--backend NAME|all] [--aarch64]

Every backend of the registry that this machine can run (`all`, the default) is measured in the
same run and reported against the portable C path (`vs portable`: its time over portable's);
a device backend (cuda, metal) gets the tensors copied into its memory first (the copy is not
timed), as llama.cpp's offloaded weights already are.  --aarch64 also runs the NEON backend's
kernel benchmark (native/tests/bench_backends.c) cross-built for aarch64 under qemu-aarch64
(scripts/test_aarch64.sh builds it): those figures are emulated, not a speed.

Prints a table and writes benchmarks/results/engine.json.  Ratios, not seconds, are the
figures to compare: both sides of each ratio are measured in this run, on this machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from qes_edge.native import binding as _native
from qes_edge.native.engine import TensorGroup, digest_tensors, mirrored, on_backend, random_steps, sigma_threshold
from qes_edge.gguf.model import GGUFModel
from qes_edge.gguf.models import default_model_path

PROMPT = (b"<|im_start|>user\nIs the word \"wonderful\" positive or negative? Answer with one word."
          b"<|im_end|>\n<|im_start|>assistant\nAnswer:")


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def memcpy_time(tensors, repeats=5):
    scratch = np.empty(max(t.n_bytes for t in tensors), np.uint8)

    def copy_all():
        for t in tensors:
            np.copyto(scratch[:t.n_bytes], t._array)
    copy_all()
    return median_time(copy_all, repeats)


def perturb_restore(tensors, p32, seeds, threads):
    """As the trainer does it: every tensor in one call per member, on `threads` cores."""
    group = TensorGroup(tensors, threads)
    changed = 0
    t0 = time.perf_counter()
    for seed in seeds:
        p = group.perturb(int(seed), p32)
        changed += int(p.applied.sum())
        p.restore()
    return (time.perf_counter() - t0) / len(seeds), changed / len(seeds)


def aarch64_rows() -> list[dict]:
    """The NEON backend against portable, cross-built for aarch64 and run under qemu-aarch64 by
    scripts/test_aarch64.sh (native/tests/bench_backends.c: one 8M-element Q4_K tensor, one
    thread).  Emulated: the ratio says how the instruction counts compare, not the speed of an
    aarch64 processor."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["bash", str(root / "scripts/test_aarch64.sh")], capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"backend"')]
    if r.returncode != 0 or not rows:
        print(f"aarch64 under qemu: failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        return []
    for row in rows:
        print(f"[{row['backend']}, aarch64 under qemu: EMULATED, not a speed] perturb+restore "
              f"{row['ratio_perturb_restore_to_portable']:.2f}x portable's time, update "
              f"{row['ratio_update_to_portable']:.2f}x; same bytes as portable: {row['bytes_match_portable']}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--backend", default="all")
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--aarch64", action="store_true", help="also the NEON kernels under qemu-aarch64 (emulated)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine.json")
    a = ap.parse_args(argv)

    path = default_model_path()
    model = GGUFModel(path)
    tensors = model.code_tensors()
    n_codes = sum(t.n_elements for t in tensors)
    n_bytes = sum(t.n_bytes for t in tensors)
    print(f"model {path.name}: {len(tensors)} trainable tensors, {n_codes / 1e6:.1f}M codes, {n_bytes / 1e6:.1f} MB")

    from qes_edge.llama.runtime import load_llama, time_forward
    llm = load_llama(path, n_ctx=512, n_threads=a.threads)
    tokens = llm.tokenize(PROMPT)
    t_fwd = time_forward(llm, tokens, repeats=7)
    del llm
    t_copy = memcpy_time(tensors)
    print(f"forward pass ({len(tokens)} tokens, {a.threads} threads): {t_fwd * 1e3:.1f} ms;"
          f"  memcpy of the trainable bytes: {t_copy * 1e3:.1f} ms")

    p32 = sigma_threshold(a.sigma)
    rng = np.random.default_rng(0)
    pairs = a.population // 2
    member_seeds = mirrored(np.arange(1, pairs + 1))
    backends = _native.available_backends(include_device=True) if a.backend == "all" else [a.backend]
    if "portable" not in backends:
        backends = ["portable"] + backends  # the reference every row is compared with
    steps = random_steps(rng, a.window + 1, a.population, a.sigma, a.alpha)
    before = [t._array.copy() for t in tensors]
    rows, digests = [], {}
    for backend in backends:
        with on_backend(backend, tensors):  # a device backend: the bytes in its memory, copied back after
            t_pr, changed = perturb_restore(tensors, p32, member_seeds, a.threads)
            t0 = time.perf_counter()
            upd_changed = sum(t.update(steps, threads=a.threads).changed for t in tensors)
            t_upd = time.perf_counter() - t0
            digests[backend] = digest_tensors(tensors)
        for t, b in zip(tensors, before):  # leave the model as it was
            t._array[:] = b
        row = {
            "backend": backend, "threads": a.threads,
            "perturb_restore_ms_per_member": t_pr * 1e3, "codes_changed_per_member": changed,
            "codes_changed_per_s": 2 * changed / t_pr,
            "perturb_restore_over_memcpy": t_pr / t_copy,
            "perturb_restore_over_forward": t_pr / t_fwd,
            "update_s": t_upd, "update_codes_changed": upd_changed,
            "update_over_memcpy": t_upd / t_copy, "update_over_forward": t_upd / t_fwd,
            "device": _native.is_device(backend),
        }
        ref = rows[0] if rows else row  # portable is measured first
        row["perturb_restore_vs_portable"] = t_pr / ref["perturb_restore_ms_per_member"] * 1e3
        row["update_vs_portable"] = t_upd / ref["update_s"]
        rows.append(row)
        print(f"[{backend}] perturb+restore: {t_pr * 1e3:.1f} ms per member, {changed / 1e3:.0f}k codes moved "
              f"({row['codes_changed_per_s'] / 1e6:.1f}M code edits/s) = {row['perturb_restore_over_memcpy']:.2f}x memcpy, "
              f"{row['perturb_restore_over_forward']:.3f}x forward")
        print(f"[{backend}] seed-replay update (pop {a.population}, K={a.window}): {t_upd:.2f} s, "
              f"{upd_changed} codes changed = {row['update_over_memcpy']:.0f}x memcpy, "
              f"{row['update_over_forward']:.1f}x forward")
        print(f"[{backend}] vs portable: perturb+restore {row['perturb_restore_vs_portable']:.2f}x the time, "
              f"update {row['update_vs_portable']:.2f}x the time")
    _native.set_backend("auto")
    identical = len(set(digests.values())) == 1
    print(f"updated weights identical across backends {sorted(digests)}: {identical}")
    emulated = aarch64_rows() if a.aarch64 else []
    result = {
        "model": path.name, "trainable_tensors": len(tensors), "codes": n_codes, "bytes": n_bytes,
        "population": a.population, "window": a.window, "sigma": a.sigma, "alpha": a.alpha,
        "forward_tokens": len(tokens), "forward_ms": t_fwd * 1e3, "memcpy_ms": t_copy * 1e3,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows, "backends_identical": identical,
        "aarch64_emulated": emulated,
        "date": time.strftime("%Y-%m-%d"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
