"""Commands of the overnight agent: daemon, queue and status."""

from __future__ import annotations

from .cli import app  # noqa: F401
