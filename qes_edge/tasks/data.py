"""Where a task's examples come from: `--data F.jsonl` (one file, a fixed 20% of it held out) or
`--data DIR` as mlx-lm lays data out: `train.jsonl`, and optionally `valid.jsonl` (the held-out
set, evaluated as it is and never trained on) and `test.jsonl` (scored once at the end of
training and by `eval --split test`).

The run config records the split (`split`): "fixed" (a fixed 20% of the training file held out:
runs before the folder layout, and any `--data F`) or "valid" (valid.jsonl).  A run resumes with
the split it recorded, whatever files appear beside it later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("fixed", "valid")          # what a run holds out (its config's `split`)
EVAL_SPLITS = ("heldout", "valid", "test", "train", "all")  # what `eval --split` scores
FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class DataFiles:
    path: Path                 # what --data named
    train: Path
    valid: Path | None = None
    test: Path | None = None

    @property
    def folder(self) -> bool:
        return self.path.is_dir()

    def default_split(self) -> str:
        """The split a new run takes: valid.jsonl where there is one, else the fixed 20%."""
        return "valid" if self.valid is not None else "fixed"


def data_files(path: str | Path) -> DataFiles:
    """The files of --data (ValueError naming what is wrong)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file not found: {p}")
    if p.is_file():
        return DataFiles(p, p)
    if not p.is_dir():
        raise ValueError(f"{p}: is neither a JSONL file nor a folder of them")
    found = {k: p / name for k, name in FILES.items() if (p / name).is_file()}
    if "train" not in found:
        present = sorted(x.name for x in p.iterdir() if x.suffix == ".jsonl")
        raise ValueError(f"{p}: a data folder needs train.jsonl (and may hold valid.jsonl and test.jsonl); it holds "
                         + (", ".join(present) if present else "no .jsonl file"))
    return DataFiles(p, found["train"], found.get("valid"), found.get("test"))


def describe(files: DataFiles, split: str, n_train: int, n_heldout: int, n_test: int) -> str:
    """One line: what is trained on, what is held out, what is scored at the end."""
    if split == "valid":
        held = f"held-out: {files.valid.name} as it is ({n_heldout} examples, never trained on)"
        train = f"trained on {files.train.name} ({n_train})"
    elif files.folder:
        held = (f"held-out: a fixed 20% of {files.train.name} ({n_heldout} of {n_train + n_heldout}; "
                f"put a valid.jsonl beside it to hold out your own)")
        train = f"trained on the other {n_train}"
    else:
        held = (f"held-out: a fixed 20% of {files.train.name} ({n_heldout} of {n_train + n_heldout} lines; "
                "give --data DIR with train.jsonl and valid.jsonl to hold out your own)")
        train = f"trained on the other {n_train}"
    test = f"; {files.test.name} ({n_test}) scored once at the end" if files.test is not None and n_test else ""
    return f"data {files.path}: {train}; {held}{test}"
