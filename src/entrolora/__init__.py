"""entrolora: decide where LoRA capacity goes from the model's own gradients.

Public API only (shared/DESIGN.md). Names resolve lazily so that ``import entrolora`` stays cheap
and optional dependencies (transformers, peft, matplotlib) load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__ as __version__

_EXPORTS = {
    "probe": "probing",
    "GradientStats": "stats",
    "ModuleStats": "stats",
    "AdaptationPlan": "plans",
    "ModulePlan": "plans",
    "GroupPlan": "plans",
    "find_targets": "targets",
    "plan": "planners",
    "PLANNERS": "planners",
    "plan_lora": "planners",
    "plan_sharelora": "planners",
    "plan_e2lora": "planners",
    "plan_e2sharelora": "planners",
    "plan_e2dora": "planners",
    "plan_e2vera": "planners",
    "plan_e2lori": "planners",
    "plan_ralora": "planners",
    "plan_ralora_pro": "planners",
    "plan_ls_lora": "planners",
    "plan_lora_gid": "planners",
    "plan_flexlora": "planners",
    "plan_auto": "planners",
    "apply": "adapters.inject",
    "merge": "adapters.inject",
    "unmerge": "adapters.inject",
    "trainable_parameters": "adapters.inject",
    "adapted_modules": "adapters.inject",
    "FlexLoRA": "flex",
    "save": "export.io",
    "load": "export.io",
    "export_peft": "export",
    "export_merged": "export",
    "to_peft_config": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'entrolora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
