"""The noise command: the noise a tensor's codes get, from the spec alone."""

from __future__ import annotations

import json

import numpy as np
import typer

from qes_edge.cli.common import _fail, app
from qes_edge.native.quant import QESError


@app.command()
def noise(tensor: str = typer.Option(..., help="Tensor name (keys the noise)."),
          n: int = typer.Option(..., min=1, help="Elements in the tensor."),
          seed: int = typer.Option(..., help="Member seed (nonzero; -s is the mirror of s)."),
          sigma: float = typer.Option(0.01, help="Noise scale in code units."),
          limit: int = typer.Option(20, help="Draws to print (0: all).")):
    """Print the noise draws of (tensor, seed, sigma) as JSON lines: the spec's reference output.

    Example: qes-edge noise --tensor blk.0.ffn_up.weight --n 884736 --seed 1"""
    from qes_edge.native.engine import CodeTensor, sigma_threshold
    from qes_edge.native.quant import QT
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


# commands that live in modules of their own register themselves on `app`
