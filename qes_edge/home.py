"""Where qes-edge keeps a user's runs: one folder per user, never the current directory.

`QES_EDGE_HOME` overrides it (the tests point it at a temporary folder); otherwise it is the
platform's user data folder (platformdirs: ~/.local/share/qes-edge on Linux, ~/Library/Application
Support/qes-edge on macOS).  Ledgers live in its `runs/` folder, named after the model, task
and run seed, so the same command line finds the same run again from any folder."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "QES_EDGE_HOME"
#: the overnight agent's queue and job table, in the home folder (agent/db.py)
DAEMON_DB = "daemon.db"


def home() -> Path:
    override = os.environ.get(ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("qes-edge", appauthor=False))


def runs_dir() -> Path:
    return home() / "runs"


def default_ledger(model_path: Path, task: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return runs_dir() / f"{Path(model_path).stem}.{safe}.s{seed}.qes"
