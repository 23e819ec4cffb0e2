"""The training job behind ``entrolora train``, ``demo``, ``probe`` and ``export``.

One job per module: ``config`` (what a run is asked to do), ``models`` (which model, family, default
targets, heads, device, whether a model folder fits), ``state`` (what a run loaded), ``probe`` (the
probe and plan steps), ``baselines`` (peft's methods), ``loop`` (optimizer, schedule, steps,
evaluation), ``run`` (``train_run``: the steps in order), ``demo`` and ``export`` (``export_run``);
``sft`` (``--task sft``: splits, batches, exact match) and ``generate`` (answers from a run). Output
folders are staged and published by ``guards/staging.py``.
"""

from __future__ import annotations

from ..guards.staging import (
    RUN_MARKER,
    OutputFolder,
    check_output,
    describe,
    output_kind,
    sweep_orphans,
    terminate_as_exit,
)  # fmt: skip
from .config import (
    ENTROLORA_METHODS,
    FLEX_CONTROLLER_OPTIONS,
    METHODS,
    MODEL_PLANNERS,
    PEFT_METHODS,
    PEFT_OPTIONS,
    PROBE_HEADS,
    RunResult,
    TrainConfig,
    check_options,
    check_probe_head,
    method_options,
    normalize_method,
    parse_options,
    parse_value,
    planner_name,
    validate_config,
)  # fmt: skip
from .demo import DEMO_MARKER, DEMO_METHODS, demo_run
from .export import export_run
from .loop import evaluate, peak_memory, seed_everything
from .models import (
    DEFAULT_TARGETS,
    FAMILY,
    HEAD_NAMES,
    default_targets,
    head_modules,
    load_model,
    resolve_device,
    resolve_model,
)  # fmt: skip
from .probe import centroid_head, make_plan, output_layer, run_probe
from .run import load_splits, train_run

__all__ = [
    "DEFAULT_TARGETS",
    "DEMO_MARKER",
    "DEMO_METHODS",
    "ENTROLORA_METHODS",
    "FAMILY",
    "FLEX_CONTROLLER_OPTIONS",
    "HEAD_NAMES",
    "METHODS",
    "MODEL_PLANNERS",
    "OutputFolder",
    "PEFT_METHODS",
    "PEFT_OPTIONS",
    "PROBE_HEADS",
    "RUN_MARKER",
    "RunResult",
    "TrainConfig",
    "centroid_head",
    "check_options",
    "check_probe_head",
    "check_output",
    "default_targets",
    "demo_run",
    "describe",
    "evaluate",
    "export_run",
    "head_modules",
    "load_model",
    "load_splits",
    "make_plan",
    "method_options",
    "normalize_method",
    "output_kind",
    "output_layer",
    "parse_options",
    "parse_value",
    "peak_memory",
    "planner_name",
    "resolve_device",
    "resolve_model",
    "run_probe",
    "seed_everything",
    "sweep_orphans",
    "terminate_as_exit",
    "train_run",
    "validate_config",
]
