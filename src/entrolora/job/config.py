"""What a run is asked to do: ``TrainConfig``, ``RunResult``, method names and their options.

Everything here is cheap and pure: it checks the request before any model or data loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data import datasets as D
from ..data import sft as S
from ..data.sft import SFTOptions

ENTROLORA_METHODS = (
    "lora", "sharelora", "e2lora", "e2sharelora", "e2dora", "e2vera", "e2lori",
    "ralora", "ralora-pro", "ls-lora", "lora-gid", "flexlora", "auto",
)  # fmt: skip
PROBE_HEADS = ("centroid", "model")  # job.probe.centroid_head; "model": the head as loaded
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")  # = inject.ADAPTER_DTYPES' names
PEFT_METHODS = ("peft-lora", "dora", "adalora", "vera", "lora-plus", "eva", "lora-ga", "pissa")
# peft initialisations that read calibration batches (EVA: activations; LoRA-GA: gradients)
PEFT_CALIBRATED = ("eva", "lora-ga")
# peft initialisations that change the base weights (W − B₀A₀): their export is converted
PEFT_RESIDUAL = ("pissa", "lora-ga")
METHODS = ENTROLORA_METHODS + PEFT_METHODS
MODEL_PLANNERS = ("lora", "sharelora", "flexlora")  # plan from the model, no probe needed
FLEX_CONTROLLER_OPTIONS = {
    "b0": 4, "t_warmup": None, "t_final": None, "interval": None, "gamma": 0.1, "r_min": 1,
    "importance": "spectrum",
}  # fmt: skip
# E²LoRI's mask: B's calibration magnitudes |G·Aᵀ| from the probe (LoRI), or seeded random
LORI_APPLY_OPTIONS = {"mask": "magnitude"}
PEFT_OPTIONS: dict[str, dict[str, Any]] = {
    "peft-lora": {"lora_alpha": 16},
    "dora": {"lora_alpha": 16},
    "adalora": {"lora_alpha": 16, "init_r": None, "tinit": None, "tfinal": None, "deltaT": None},
    "vera": {"d_initial": 0.1},
    "lora-plus": {"lora_alpha": 16, "loraplus_lr_ratio": 16.0},
    # peft's EvaConfig (rho: a module's rank at most rho·r; tau: SVD convergence threshold)
    "eva": {"lora_alpha": 16, "rho": 2.0, "tau": 0.99},
    # peft's LoraGAConfig; the gradients come from --probe-steps training batches
    "lora-ga": {"lora_alpha": 16, "direction": "ArB2r", "scale": "stable", "stable_gamma": 16},
    # niter None: exact SVD ("pissa"); an integer N: peft's "pissa_niter_N" (randomised SVD)
    "pissa": {"lora_alpha": 16, "niter": None},
}


@dataclass
class TrainConfig:
    """Everything ``entrolora train`` takes; defaults are the CLI's."""

    model: str | None = None  # None: the embedded MiniLM; "smollm2": the GGUF causal LM
    data: str | None = None  # None: the embedded Rotten Tomatoes snippets
    text_column: str = "text"
    label_column: str = "label"
    # labels that differ only by case or spacing (pos, Pos, "pos ") made one class, not refused
    merge_labels: bool = False
    task: str = "classify"
    method: str = "e2lora"
    r: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    target_modules: list[str] | None = None
    probe_steps: int = 64
    probe_head: str = "centroid"  # classify: the head the probe reads through (PROBE_HEADS)
    stats: str | None = None  # reuse a statistics file
    keep_gradients: bool = False  # save the probed gradients too (cosine/L1/L2 similarity reuse)
    plan: str | None = None  # reuse a plan file
    epochs: int = 2
    max_steps: int | None = None
    lr: float = 2e-3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    dropout: float = 0.0
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 64
    test_fraction: float = 0.2
    limit: int | None = None
    # True: ``limit`` subsets the training side only and the model is evaluated on the whole
    # held-out split of the full data (films split as without a limit): a subset's few hundred
    # held-out rows cannot tell methods 1-2 pp apart (standard error ~1.7 pp at 600)
    full_test: bool = False
    seed: int = 0
    init_seed: int | None = None  # seed of the adapters' initial factors (None: ``seed``)
    adapter_dtype: str | None = None  # None: float32 (as peft); or inject.ADAPTER_DTYPES' names
    device: str = "auto"
    output: str = "runs/run"
    overwrite: bool = False
    progress: bool = True
    report: bool = True
    sft: SFTOptions = field(default_factory=SFTOptions)  # --task sft: columns, chat template


@dataclass
class RunResult:
    """What ``train_run`` produced: the run folder, its metrics and the objects behind them.

    ``losses`` is the training loss of every optimizer step (also ``train_loss.json``).
    """

    output: Path
    metrics: dict[str, Any]
    plan: Any = None
    stats: Any = None
    history: list | None = None
    losses: list[float] = field(default_factory=list)


def normalize_method(method: str) -> str:
    """CLI spelling of a method (``ralora_pro`` → ``ralora-pro``); ValueError if unknown."""
    m = str(method).strip().lower().replace("_", "-")
    if m == "loraplus":
        m = "lora-plus"
    if m not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return m


def planner_name(method: str) -> str:
    """The ``entrolora.plan`` name of a method (``ralora-pro`` → ``ralora_pro``)."""
    return normalize_method(method).replace("-", "_")


def parse_value(text: str) -> Any:
    """``"8"`` → 8, ``"0.5"`` → 0.5, ``"true"`` → True, ``"none"`` → None, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` → ``{key: value}``; ValueError on an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {item!r} is not key=value; write e.g. --option n_max=16")
        out[key.strip()] = parse_value(value)
    return out


def method_options(method: str) -> dict[str, Any]:
    """``{option: default}`` a method accepts (planner options; FlexLoRA adds its schedule)."""
    method = normalize_method(method)
    if method in PEFT_METHODS:
        return dict(PEFT_OPTIONS[method])
    from ..planners import planner_options

    opts = dict(planner_options(planner_name(method)))
    if method == "flexlora":
        opts.update(FLEX_CONTROLLER_OPTIONS)
    if method == "e2lori":
        opts.update(LORI_APPLY_OPTIONS)
    return opts


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """ValueError naming an option the method does not know, with the known ones."""
    known = method_options(method)
    for key in options:
        if key not in known:
            raise ValueError(
                f"unknown option {key!r} for method {normalize_method(method)}; known options: "
                f"{', '.join(sorted(known)) or 'none'}"
            )


def check_probe_head(probe_head: str) -> None:
    """ValueError unless ``probe_head`` is one of ``PROBE_HEADS``."""
    if probe_head not in PROBE_HEADS:
        choices = ", ".join(PROBE_HEADS)
        raise ValueError(f"--probe-head must be one of {choices}, got {probe_head!r}")


def validate_config(cfg: TrainConfig) -> str:
    """Cheap checks before anything loads; returns the normalised method name.

    The output folder is checked by the caller (``guards/staging.py``).
    """
    method = normalize_method(cfg.method)
    if cfg.task not in D.TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(D.TASKS)}")
    for name in ("r", "epochs", "batch_size", "eval_batch_size", "max_length"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {v!r}")
    if cfg.max_length < 2:  # one token leaves nothing to predict or classify beside [CLS]
        raise ValueError(f"--max-length must be ≥ 2, got {cfg.max_length}")
    if cfg.probe_steps < 1:
        raise ValueError(f"--probe-steps must be ≥ 1, got {cfg.probe_steps}")
    check_probe_head(cfg.probe_head)
    if cfg.task == "sft":
        check_sft(cfg)
    if cfg.adapter_dtype is not None and cfg.adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(
            f"--adapter-dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {cfg.adapter_dtype!r}"
        )
    # sft: --max-steps 0 scores the model as adapted, untrained (LoRA's B = 0: the base model)
    least = 0 if cfg.task == "sft" else 1
    if cfg.max_steps is not None and cfg.max_steps < least:
        raise ValueError(f"--max-steps must be ≥ {least}, got {cfg.max_steps}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if method in PEFT_METHODS and (cfg.plan or cfg.stats):
        raise ValueError(f"{method} is a peft baseline: it takes no --plan or --stats")
    if cfg.plan and cfg.stats:
        raise ValueError("pass either --plan (reuse a plan) or --stats (plan again), not both")
    check_options(method, cfg.options)
    for p, flag in ((cfg.stats, "--stats"), (cfg.plan, "--plan")):
        if p and not Path(p).is_file():
            raise FileNotFoundError(f"{flag} file {p!r} does not exist")
    if cfg.plan:
        check_plan_method(cfg.plan, method)
    check_reuse(cfg, method)
    check_unused(cfg, method)
    return method


def probes(cfg: TrainConfig, method: str) -> str | None:
    """None when the run probes gradients; otherwise why it does not (in CLI words)."""
    if cfg.plan:
        return "--plan reuses a plan, so no probe runs"
    if cfg.stats:
        return "--stats reuses the statistics as they are, so no probe runs"
    if method in PEFT_METHODS:
        return f"{method} is a peft baseline and probes nothing"
    if method in MODEL_PLANNERS:
        return f"{method} plans from the model and probes nothing"
    return None


def check_unused(cfg: TrainConfig, method: str) -> None:
    """ValueError for an option the run would ignore while ``metrics.json`` records it as
    given: every recorded value is the one used (``--keep-gradients`` without a probe was
    ignored while the metrics said on)."""
    why = probes(cfg, method)
    if cfg.keep_gradients and why:
        raise ValueError(
            f"--keep-gradients has no effect here: {why} whose gradients it would keep; drop "
            "--keep-gradients (`entrolora probe --keep-gradients` writes a statistics file "
            "with them)"
        )
    if cfg.probe_head != "centroid" and why:
        raise ValueError(f"--probe-head {cfg.probe_head} has no effect here: {why}; drop it")
    if cfg.adapter_dtype is not None and method in PEFT_METHODS:
        raise ValueError(
            f"--adapter-dtype has no effect on {method}: peft baselines keep peft's own dtype; "
            "drop it, or train an entrolora method"
        )


def check_reuse(cfg: TrainConfig, method: str) -> None:
    """ValueError for what a reused plan or statistics file would silently ignore.

    ``--plan`` fixes the modules and every planner option; ``--stats`` fixes the modules. Only
    options applied after planning (FlexLoRA's schedule, E²LoRI's mask) still act.
    """
    if cfg.target_modules and (cfg.plan or cfg.stats):
        flag = "--plan" if cfg.plan else "--stats"
        raise ValueError(
            f"--target-modules has no effect with {flag}: the {flag[2:]} file fixes the modules; "
            f"drop --target-modules, or probe again without {flag}"
        )
    if cfg.plan and method not in PEFT_METHODS:
        from ..planners import planner_options

        planned = sorted(set(cfg.options) & set(planner_options(planner_name(method))))
        if planned:
            raise ValueError(
                f"option(s) {', '.join(planned)} are planner options and --plan reuses a plan as "
                "it is; drop them, or plan again with --stats instead of --plan"
            )


def check_plan_method(plan_path: str, method: str) -> None:
    """ValueError when ``--plan`` was made by another method than ``--method``.

    The method decides how a plan trains (FlexLoRA's controller, option names) and how the run
    is labelled in metrics, tables and reports, so the two must agree. A hand-written plan
    whose ``method`` names no entrolora method may be trained by any.
    """
    from ..plans import AdaptationPlan

    made_by = AdaptationPlan.load(plan_path).method
    try:
        made_by = normalize_method(made_by)
    except ValueError:
        return
    if made_by != method:
        raise ValueError(
            f"--plan {plan_path!r} was made by {made_by} but --method is {method}; pass "
            f"--method {made_by} (a run trains, and is labelled, as its plan's method)"
        )


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its input paths (model folder, data, stats, plan) made absolute, so that
    ``metrics.json`` and a later ``entrolora export`` work from any directory."""

    def absolute(value: str | None, keywords: tuple[str, ...] = ()) -> str | None:
        if value is None or value in keywords or not Path(value).expanduser().exists():
            return value  # a keyword, or a missing path the checks will name as typed
        return str(Path(value).expanduser().resolve())

    return replace(
        cfg,
        model=absolute(cfg.model, ("default", D.DEFAULT_MODEL, D.SMOLLM2)),
        data=absolute(cfg.data, ("default",)),
        stats=absolute(cfg.stats),
        plan=absolute(cfg.plan),
    )


def check_sft(cfg: TrainConfig) -> None:
    """Cheap checks of the SFT options, before anything loads."""
    o = cfg.sft
    if o.chat_template not in S.CHAT_TEMPLATES:
        raise ValueError(f"--chat-template must be auto or none, got {o.chat_template!r}")
    if o.eval_split not in S.EVAL_SPLITS:
        raise ValueError(f"--eval-split must be test or validation, got {o.eval_split!r}")
    if o.eval_split != "test" and cfg.data not in (None, "default"):
        raise ValueError(
            "--eval-split picks a split of the shipped math set; with --data the held-out rows "
            "are a seeded 20 % of the file"
        )
    if o.eval_limit is not None and o.eval_limit < 1:
        raise ValueError(f"--eval-limit must be ≥ 1, got {o.eval_limit}")
    if cfg.probe_head != "centroid":  # the classify-only option, left at its default
        raise ValueError("--probe-head applies to --task classify only")
