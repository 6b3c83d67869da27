"""Commands that read a run's record: log and report."""

from __future__ import annotations

from .cli import app  # noqa: F401
