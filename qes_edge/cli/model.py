"""Commands about a model file: info, demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qes_edge.cli import common
from qes_edge.cli.common import JsonOpt, ModelOpt, ThreadsOpt, _fail, app
from qes_edge.native import binding as _native
from qes_edge.native.quant import QESError


def _open(model: Optional[str]):
    from qes_edge.gguf.model import GGUFModel
    from qes_edge.gguf.models import ModelNotFound, resolve_model
    try:
        path = resolve_model(model)
        return path, GGUFModel(path)
    except (ModelNotFound, QESError) as e:
        _fail(str(e))


@app.command()
def info(model: Optional[str] = ModelOpt, as_json: bool = JsonOpt,
         gpu_layers: Optional[str] = typer.Option(None, "--gpu-layers", metavar="N|all",
                                                  help="Also show which trainable tensors llama.cpp would put on "
                                                       "the GPU with train's --gpu-layers N, and whether this "
                                                       "llama.cpp can offload.")):
    """Show a model's tensor types, what qes-edge would train, the native backend, the threads and
    llama.cpp's wait policy.

    info reads and checks the file's header (metadata, tensor table, hyperparameters, tokenizer
    ids); it does not load the model in llama.cpp, so a file it accepts can still be refused
    when `train` or `eval` loads it (with one error line).

    Example: qes-edge info --model smollm2:135m"""
    path, m = _open(model)
    placement = _placement(m, gpu_layers)
    if as_json:
        from qes_edge.gguf.model import trainable_infos
        from qes_edge.threads import default_threads, wait_policy
        try:
            planned = trainable_infos(m.header.tensors)
            trainable = {"tensors": len(planned), "codes": sum(t.n_elements for t in planned)}
        except QESError as e:
            trainable = {"error": str(e)}
        typer.echo(json.dumps({"model": str(path), "types": m.summary(), "trainable": trainable,
                               "backend": _native.get_backend(), "backends": _native.available_backends(True),
                               "backends_compiled": [r["name"] for r in _native.backends() if r["compiled"]],
                               "backend_registry": _native.backends(),
                               "noise_spec": int(_native.lib.qes_noise_spec_version()),
                               "threads": default_threads(), "wait_policy": wait_policy(),
                               "kv_bytes_per_token": _kv_cell_bytes(m),
                               **({"placement": placement} if placement else {})}))
        return
    table = Table(title=str(path))
    for col in ("type", "tensors", "elements", "MB", "trainable"):
        table.add_column(col, justify="right" if col != "type" else "left")
    from qes_edge.native.quant import QT, is_trainable
    for name, row in sorted(m.summary().items()):
        table.add_row(name, str(row["tensors"]), f"{row['elements']:,}", f"{row['bytes'] / 1e6:.1f}",
                      "codes" if name in QT.__members__ and is_trainable(QT[name]) else "left alone")
    common.console.print(table)
    try:
        tensors = m.code_tensors()
        common.console.print(f"trained by default: {len(tensors)} tensors, {sum(t.n_elements for t in tensors):,} codes "
                             "(token embedding and output head frozen)")
    except QESError as e:
        common.console.print(f"[red]not trainable:[/] {e}")
    from qes_edge.threads import default_threads, wait_policy
    common.console.print(f"native backend: {_native.get_backend()} active ({_backend_source()}); "
                         f"noise spec v{_native.lib.qes_noise_spec_version()}")
    common.console.print("  " + "; ".join(f"{r['name']}: " + ("available" if r["available"] else "compiled in, not usable here"
                                                       if r["compiled"] else "not compiled in")
                                   + (" (device)" if r["device"] else "") for r in _native.backends()
                                   if r["name"] != "standin" or r["available"]),  # the tests' stand-in device
                         highlight=False)
    common.console.print(f"threads: {default_threads()} by default (--threads); llama.cpp's OpenMP threads wait: {wait_policy()}")
    if placement:
        where = (f"{placement['gpu']} trainable tensors in GPU memory (layers {placement['gpu_from']}.."
                 f"{placement['n_layer'] - 1}), {placement['host']} in host memory" if placement["gpu"]
                 else f"all {placement['host']} trainable tensors in host memory")
        common.console.print(f"--gpu-layers {gpu_layers}: {where}; this llama.cpp "
                             + ("can offload" if placement["offload_supported"] else
                                "is a CPU-only build (QES_EDGE_GPU=cuda bash scripts/install.sh builds one that offloads)"),
                             highlight=False)
    cell = _kv_cell_bytes(m)
    if cell:
        from qes_edge.training.config import TrainConfig
        common.console.print(f"KV cache: {cell / 1024:.1f} KiB a token (f16); training evaluates 8 prompts a decode "
                             "for the tasks that generate, one for sentiment and choice (--eval-batch), its cache "
                             f"sized at start from the task's longest prompts (at least --n-ctx {TrainConfig.n_ctx} "
                             f"tokens: {TrainConfig.n_ctx * cell / 2**20:.1f} MiB)")


def _placement(m, gpu_layers: Optional[str]) -> dict | None:
    """Where --gpu-layers would put the trainable tensors (llama.cpp's rule: placement.planned_on_gpu)."""
    if gpu_layers is None:
        return None
    from qes_edge.gguf.model import trainable_infos
    from qes_edge.llama.placement import (block_count, first_gpu_layer, offload_supported, parse_gpu_layers,
                                          planned_on_gpu)
    try:
        n = parse_gpu_layers(gpu_layers)
        planned = trainable_infos(m.header.tensors)
    except (ValueError, QESError) as e:
        _fail(str(e))
    n_layer = block_count(m.header.metadata)
    if n_layer is None:
        _fail(f"{m.path}: the header has no block_count: where layers go cannot be told")
    on_gpu = [t.name for t in planned if planned_on_gpu(t.name, n_layer, n)]
    return {"gpu_layers": n, "n_layer": n_layer, "gpu": len(on_gpu), "host": len(planned) - len(on_gpu),
            "gpu_from": first_gpu_layer(n_layer, n), "offload_supported": offload_supported()}


def _kv_cell_bytes(m) -> int | None:
    from qes_edge.llama.batched import kv_bytes_per_cell
    try:
        return kv_bytes_per_cell(m.header.metadata)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _backend_source() -> str:
    import os
    forced = os.environ.get("QES_EDGE_BACKEND")
    return f"QES_EDGE_BACKEND={forced}" if forced and forced != "auto" else "the best available host backend"


DEMO_TOKENS = 12  # what `demo` generates from its prompt


@app.command()
def demo(model: Optional[str] = ModelOpt,
         population: int = typer.Option(8, min=2, help="Members (mirrored pairs) to perturb and restore."),
         sigma: float = typer.Option(0.01, help="Noise scale in code units."),
         alpha: float = typer.Option(0.001, help="Step size."),
         window: int = typer.Option(50, min=0, help="Steps replayed into the residual (seed replay)."),
         threads: int = ThreadsOpt,
         out: Optional[Path] = typer.Option(None, help="Write the updated model here (GGUF)."),
         prompt: str = typer.Option("The capital of France is", help="Prompt for the llama.cpp check.")):
    """Run the engine end to end on a real model: llama.cpp inference, perturb/restore of every
    trainable tensor with an exact-restore check, and one seed-replay update.

    Example: qes-edge demo --population 8 --out updated.gguf"""
    from qes_edge.native.engine import TensorGroup, mirrored, random_steps, sigma_threshold
    from qes_edge.llama.runtime import load_llama

    if population % 2:
        _fail("population must be even (mirrored pairs)")
    path, m = _open(model)
    if out is not None:
        from qes_edge.atomic import check_output_path
        try:
            check_output_path(out, {"model": path})
        except ValueError as e:
            _fail(str(e))
    try:
        p32 = sigma_threshold(sigma)
        tensors = m.code_tensors()
    except QESError as e:
        _fail(str(e))
    common.console.print(f"[bold]{path.name}[/]: {len(tensors)} trainable tensors, "
                         f"{sum(t.n_elements for t in tensors):,} codes; backend {_native.get_backend()}")

    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=256, n_threads=threads)
    tokens = llm.tokenize(prompt.encode("utf-8", "surrogateescape"), add_bos=True, special=False)
    room = llm.n_ctx() - DEMO_TOKENS
    if len(tokens) > room:
        _fail(f"--prompt is {len(tokens)} tokens, but the demo's context holds {llm.n_ctx()} with {DEMO_TOKENS} to "
              f"generate: give a prompt of at most {room} tokens")
    text = llm.create_completion(tokens, max_tokens=DEMO_TOKENS, temperature=0.0)["choices"][0]["text"]
    common.console.print(f"llama.cpp ({time.perf_counter() - t0:.1f} s): {prompt!r} -> {text!r}")
    del llm

    digest0 = m.weights_digest(tensors)
    pairs = population // 2
    seeds = mirrored(range(1, pairs + 1)).tolist()
    moved = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=common.console)
    group = TensorGroup(tensors)
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("perturb + restore", total=len(seeds))
        for seed in seeds:
            p = group.perturb(seed, p32)
            moved += int(p.applied.sum())
            p.restore()
            progress.advance(task)
    t_pr = (time.perf_counter() - t0) / len(seeds)
    exact = m.weights_digest(tensors) == digest0
    common.console.print(f"perturb + restore: {moved / len(seeds):,.0f} codes moved per member, {t_pr * 1e3:.1f} ms per member; "
                         f"every byte restored: {'[green]yes[/]' if exact else '[red]NO[/]'}")
    if not exact:
        raise typer.Exit(1)

    steps = random_steps(np.random.default_rng(0), window + 1, population, sigma, alpha)
    t0 = time.perf_counter()
    changed = sum(t.update(steps, threads=threads).changed for t in tensors)
    common.console.print(f"seed-replay update (K={window}, population {population}): {changed:,} codes changed in "
                         f"{time.perf_counter() - t0:.2f} s")
    if out:
        try:
            m.write(tensors, out)
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror or e}")
        common.console.print(f"wrote {out}")
