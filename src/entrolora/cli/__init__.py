"""The ``entrolora`` command line: train, demo, probe, plan, report, export, generate.

Errors print one line naming the fix and exit with status 1; ``--debug`` shows the traceback.
One module per command group: ``train`` (train, demo), ``probe_plan`` (probe, plan),
``outputs`` (report, export), ``generate`` (answers from a run); ``common`` holds the app,
shared options and the error guard.
"""

from __future__ import annotations

import importlib

from .common import app, guarded

# importing a command module registers its commands on ``app``, in this (the help's) order
for _module in ("train", "probe_plan", "outputs", "generate"):
    importlib.import_module(f".{_module}", __name__)

__all__ = ["app", "guarded", "main"]


def main() -> None:
    """Console entry point."""
    app()
