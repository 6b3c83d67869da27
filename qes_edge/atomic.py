"""Files that must survive a crash or a full disk: written beside their destination, fsynced,
renamed over it, and the folder fsynced.  A failure leaves the old file (or none) and removes
the temporary one, whatever the failure was (a full disk, an interrupt, a bug)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def check_output_path(out: Path, inputs: dict[str, Path] | None = None) -> None:
    """Refuse, before any work, an output that cannot be written or that is one of the inputs.
    Raises ValueError with a one-line reason."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; give a file name to write")
    if not parent.is_dir():
        raise ValueError(f"{out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: the folder {parent} is not writable")
    for what, p in (inputs or {}).items():
        if p is None:
            continue
        p = Path(p)
        same = out.exists() and p.exists() and os.path.samefile(out, p)
        if same or out.resolve() == p.resolve():
            raise ValueError(f"{out}: is the {what}; refusing to overwrite an input")


@contextlib.contextmanager
def atomic_path(out: str | Path):
    """Yields a temporary path beside out for the caller (or a library) to write; on success the
    file is fsynced, renamed over out and the folder fsynced; on any failure it is removed."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(out.parent if str(out.parent) else ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def atomic_output(out: str | Path, mode: str = "wb"):
    """Yields (temporary path, open file); on success the file is fsynced and renamed to out."""
    with atomic_path(out) as tmp:
        with open(tmp, mode) as f:
            yield tmp, f
