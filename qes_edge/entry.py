"""The `qes-edge` console script: the command line, with the two errors that can stop it before
it starts (no libqes, or QES_EDGE_BACKEND naming a backend this machine lacks) as one line."""

import sys


def main() -> None:
    from qes_edge.native.errors import BackendUnavailable, NativeLibraryMissing
    try:
        from qes_edge.cli.main import main as cli_main
    except (NativeLibraryMissing, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cli_main()
