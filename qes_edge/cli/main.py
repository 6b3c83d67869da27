"""qes-edge command line: the app with every command group registered, and the entry point.

Run through :func:`main` (the `qes-edge` entry point), which also turns click's usage errors into
one line."""

from __future__ import annotations

import errno
import sys

import typer

# each command module registers its commands on the app when imported
# (in the order of `qes-edge --help`)
from qes_edge.cli import model, train, ledgers, noise  # noqa: F401,I001
from qes_edge.cli import calibrate, daemon, runs, sync, workers  # noqa: F401,I001
from qes_edge.cli.common import _one_line, app, click

def main(argv: list[str] | None = None) -> None:
    """The `qes-edge` entry point: click's usage errors and file-system errors become one line."""
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="qes-edge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        sys.exit(0)
    except click.ClickException as e:
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno == errno.EPIPE:
            sys.exit(1)
        where = f"{e.filename}: " if e.filename else ""
        typer.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)
