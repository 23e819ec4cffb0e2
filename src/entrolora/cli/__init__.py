"""The ``entrolora`` command line: train, demo, probe, plan, report, export.

Errors print one line naming the fix and exit with status 1; ``--debug`` shows the traceback.
One module per command group: ``train`` (train, demo), ``probe_plan`` (probe, plan),
``outputs`` (report, export); ``common`` holds the app, shared options and the error guard.
"""

from __future__ import annotations

from . import outputs, probe_plan, train  # noqa: F401  (registers the commands on ``app``)
from .common import app, guarded

__all__ = ["app", "guarded", "main"]


def main() -> None:
    """Console entry point."""
    app()
