"""Load a repository script (bench/, examples/) as a module, for tests that call its main()."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """Import ``ROOT/relpath`` under a unique module name; its folder goes on ``sys.path`` so that
    sibling helpers (``bench/common.py``) import, and the module stays in ``sys.modules`` because
    dataclasses look their module up there."""
    path = ROOT / relpath
    sys.path[:0] = [str(path.parent), str(ROOT / "bench")]  # its folder and bench/common.py
    name = "script_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
