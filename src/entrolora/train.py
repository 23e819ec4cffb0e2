"""The training job behind ``entrolora train`` and ``entrolora demo``: ``train_run(config)``.

probe (when the method needs statistics; or reuse ``config.stats``) → plan (or reuse
``config.plan``) → apply → train (AdamW, linear warm-up then linear decay, progress bar) →
evaluate on the held-out split → write the run folder:

    metrics.json        accuracy / loss, trainable parameters, times, peak memory
    stats.safetensors   gradient statistics (when probed or given)
    plan.json           the adaptation plan
    adapter/            el.save(model) (+ head.safetensors: the trained classifier head)
    peft/               el.export_peft(model) — a stock peft LoRA checkpoint
    flex_history.json   FlexLoRA rank history (flexlora only)
    report.html, *.png  entrolora.report

Classification trains the classifier head too (peft's ``modules_to_save`` semantics): after
``apply`` froze the base model, the head (``classifier`` / ``score``) is made trainable, saved
as ``adapter/head.safetensors`` and added to the peft export under ``modules_to_save``.

The peft baselines (peft-lora, dora, adalora, vera, lora-plus) are built with peft itself; their
run folder holds ``peft/`` (``save_pretrained``) instead of ``adapter/`` and ``plan.json``.

Everything is written into a temporary folder next to the output and renamed at the end, so an
interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as D
from . import distributed as eld
from . import inject
from .files import atomic_write_text

ENTROLORA_METHODS = (
    "lora", "sharelora", "e2lora", "e2sharelora", "e2dora", "e2vera", "e2lori",
    "ralora", "ralora-pro", "ls-lora", "lora-gid", "flexlora",
)  # fmt: skip
PEFT_METHODS = ("peft-lora", "dora", "adalora", "vera", "lora-plus")
METHODS = ENTROLORA_METHODS + PEFT_METHODS
MODEL_PLANNERS = ("lora", "sharelora", "flexlora")  # plan from the model, no probe needed
FLEX_CONTROLLER_OPTIONS = {
    "b0": 4, "t_warmup": None, "t_final": None, "interval": None, "gamma": 0.1, "r_min": 1,
}  # fmt: skip
PEFT_OPTIONS: dict[str, dict[str, Any]] = {
    "peft-lora": {"lora_alpha": 16},
    "dora": {"lora_alpha": 16},
    "adalora": {"lora_alpha": 16, "init_r": None, "tinit": None, "tfinal": None, "deltaT": None},
    "vera": {"d_initial": 0.1},
    "lora-plus": {"lora_alpha": 16, "loraplus_lr_ratio": 16.0},
}
HEAD_NAMES = ("classifier", "score")
DEFAULT_TARGETS = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}  # fmt: skip
FAMILY = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
    "camembert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "llama", "gemma": "llama", "gemma2": "llama", "smollm3": "llama", "gpt2": "gpt2",
}  # fmt: skip
RUN_MARKER = "metrics.json"


@dataclass
class TrainConfig:
    """Everything ``entrolora train`` takes; defaults are the CLI's."""

    model: str | None = None  # None: the embedded MiniLM; "smollm2": the GGUF causal LM
    data: str | None = None  # None: the embedded Rotten Tomatoes snippets
    text_column: str = "text"
    label_column: str = "label"
    task: str = "classify"
    method: str = "e2lora"
    r: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    target_modules: list[str] | None = None
    probe_steps: int = 64
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
    seed: int = 0
    init_seed: int | None = None  # seed of the adapters' initial factors (None: ``seed``)
    device: str = "auto"
    output: str = "runs/run"
    overwrite: bool = False
    progress: bool = True
    report: bool = True


@dataclass
class RunResult:
    """What ``train_run`` produced: the run folder, its metrics and the objects behind them."""

    output: Path
    metrics: dict[str, Any]
    plan: Any = None
    stats: Any = None
    history: list | None = None


# -- small helpers --------------------------------------------------------------------------------
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
    from .planners import planner_options

    opts = dict(planner_options(planner_name(method)))
    if method == "flexlora":
        opts.update(FLEX_CONTROLLER_OPTIONS)
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


def default_targets(model: nn.Module) -> list[str]:
    """Default target modules by model family (BERT: attention q/k/v + attention output)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY.get(model_type or "")
    if family is None:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; pass --target-modules, "
            "e.g. --target-modules q_proj,v_proj"
        )
    return list(DEFAULT_TARGETS[family])


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ValueError for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def holds_run(path: Path) -> bool:
    """True when ``path`` is a file or a non-empty folder (something we must not overwrite)."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder; FileExistsError when it already holds something and not ``overwrite``."""
    out = Path(output)
    if out.is_file():
        raise FileExistsError(f"output {str(out)!r} is a file; choose a folder with --output")
    if holds_run(out) and not overwrite:
        raise FileExistsError(
            f"output folder {str(out)!r} already holds a run; pass --overwrite to replace it "
            "or choose another --output"
        )
    return out


class Staging:
    """A temporary folder next to ``output``; ``publish()`` renames it onto ``output``."""

    def __init__(self, output: Path, overwrite: bool):
        self.output = output
        self.overwrite = overwrite
        output.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        )

    def publish(self) -> Path:
        check_output(self.output, self.overwrite)
        old = None
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, old)
        os.replace(self.path, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """``(MiB, kind)``: CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    import resource

    # ru_maxrss is in KiB on Linux: the whole process's peak, model loading and data included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_ru_maxrss"


# -- model loading --------------------------------------------------------------------------------
def resolve_model(model: str | None) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)`` of a model argument; errors name the fix."""
    if model is None or model in ("default", D.DEFAULT_MODEL):
        return D.minilm_path(), None
    if model == D.SMOLLM2:
        gguf = D.smollm2_gguf()
        return gguf.parent, gguf.name
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {model!r} does not exist; pass a local Hugging Face folder (with "
            f"config.json), '{D.SMOLLM2}', or leave --model out for the embedded MiniLM"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{model!r} has no config.json; pass a folder written by save_pretrained")
    return path, None


def load_model(
    model: str | None, task: str, num_labels: int = 2, label_names: Sequence[str] = ()
) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, family)`` from a local folder or embedded default, offline, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected
    transformers.logging.disable_progress_bar()  # per-shard loading bars drown ours
    path, gguf = resolve_model(model)
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf:
        kw.update(gguf_file=gguf, dtype=torch.float32)
    tokenizer = D.prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), **kw))
    if task == "classify":
        kw.update(num_labels=num_labels)
        if label_names:
            kw.update(
                id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)},
            )
        net = AutoModelForSequenceClassification.from_pretrained(str(path), **kw)
    else:
        net = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    if gguf:  # transformers refuses .float(), save and peft on GGUF-loaded models until cleared
        net.hf_quantizer = None
        net.is_quantized = False
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
    net = net.float()
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer, FAMILY.get(getattr(net.config, "model_type", ""), "other")


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classification head(s) of a sequence classifier (``classifier`` / ``score``)."""
    return {
        n: getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)
    }


def _unique_params(params: Any) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# -- the steps ------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def evaluate(model: nn.Module, batches: Sequence[dict], task: str, device: torch.device) -> dict:
    """Held-out loss (per example / per token) and accuracy (classify) or perplexity (causal)."""
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "classify":
                loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += int(labels.numel())
            else:
                shift, target = logits[:, :-1], labels[:, 1:]
                loss_sum += float(
                    nn.functional.cross_entropy(
                        shift.reshape(-1, shift.shape[-1]),
                        target.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += int((target != -100).sum())
    if count == 0:
        raise ValueError("the held-out split produced no labels to evaluate; use more data")
    out: dict[str, Any] = {"eval_loss": loss_sum / count, "eval_examples": count}
    if task == "classify":
        out["accuracy"] = correct / count
    else:
        out["perplexity"] = math.exp(min(out["eval_loss"], 50.0))
        out["accuracy"] = None
    return out


def _build_peft(model: nn.Module, method: str, targets: list[str], cfg: TrainConfig, total: int):
    import peft

    task_type = "SEQ_CLS" if cfg.task == "classify" else "CAUSAL_LM"
    opts = {**PEFT_OPTIONS[method], **cfg.options}
    common = {"target_modules": targets, "task_type": task_type}
    if method in ("peft-lora", "dora", "lora-plus"):
        config = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=opts["lora_alpha"],
            lora_dropout=cfg.dropout,
            use_dora=method == "dora",
            **common,
        )
    elif method == "adalora":
        tinit = opts["tinit"] if opts["tinit"] is not None else total // 10
        tfinal = opts["tfinal"] if opts["tfinal"] is not None else total // 10
        if total - tinit - tfinal < 1:
            tinit = tfinal = 0
        delta = opts["deltaT"] or max(1, (total - tinit - tfinal) // 10)
        config = peft.AdaLoraConfig(
            init_r=opts["init_r"] or max(cfg.r + 1, (3 * cfg.r) // 2),
            target_r=cfg.r,
            lora_alpha=opts["lora_alpha"],
            total_step=total,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=delta,
            lora_dropout=cfg.dropout,
            **common,
        )
    else:
        config = peft.VeraConfig(
            r=cfg.r, d_initial=opts["d_initial"], vera_dropout=cfg.dropout, **common
        )
    return peft.get_peft_model(model, config), opts


def _optimizer(model: nn.Module, method: str, cfg: TrainConfig, opts: Mapping[str, Any]):
    if method == "lora-plus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model=model,
            optimizer_cls=torch.optim.AdamW,
            lr=cfg.lr,
            loraplus_lr_ratio=float(opts["loraplus_lr_ratio"]),
            weight_decay=cfg.weight_decay,
        )
    params = _unique_params(p for p in model.parameters() if p.requires_grad)
    if not params:
        raise ValueError("the model has no trainable parameters after applying the plan")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _count(model: nn.Module, head_prefixes: Sequence[str]) -> tuple[int, int]:
    """``(adapter params, head params)`` that require grad; shared tensors counted once."""
    adapter = head = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        if any(h in parts for h in head_prefixes):
            head += p.numel()
        else:
            adapter += p.numel()
    return adapter, head


def _add_head_to_peft(
    peft_dir: Path, head: Mapping[str, torch.Tensor], names: Sequence[str]
) -> None:
    """Put the trained head into a peft export as ``modules_to_save`` (peft's key layout)."""
    from safetensors.torch import load_file, save_file

    cfg_path = peft_dir / "adapter_config.json"
    weights = peft_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        return
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(names))
    config["task_type"] = "SEQ_CLS"
    tensors = load_file(str(weights))
    tensors.update({f"base_model.model.{k}": v.contiguous() for k, v in head.items()})
    save_file(tensors, str(weights), metadata={"format": "pt"})
    atomic_write_text(cfg_path, json.dumps(config, indent=2) + "\n")


# -- the job --------------------------------------------------------------------------------------
def validate_config(cfg: TrainConfig) -> str:
    """Cheap checks before anything loads; returns the normalised method name."""
    method = normalize_method(cfg.method)
    if cfg.task not in D.TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(D.TASKS)}")
    for name in ("r", "epochs", "batch_size", "eval_batch_size", "max_length"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {v!r}")
    if cfg.probe_steps < 1:
        raise ValueError(f"--probe-steps must be ≥ 1, got {cfg.probe_steps}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max-steps must be ≥ 1, got {cfg.max_steps}")
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
    check_output(cfg.output, cfg.overwrite)
    return method


def load_splits(cfg: TrainConfig) -> tuple[D.TextDataset, D.TextDataset]:
    """Load, subset (``limit``) and split (by film for the default) the data."""
    ds = D.load_data(cfg.data, cfg.text_column, cfg.label_column, cfg.task)
    ds = D.subset(ds, cfg.limit, cfg.seed)
    train, test = D.split(ds, cfg.test_fraction, cfg.seed)
    if not len(train) or not len(test):
        raise ValueError("the train/test split left an empty side; use more data or --limit")
    return train, test


def train_run(cfg: TrainConfig) -> RunResult:
    """Run the whole job described by ``cfg``; returns the published run folder and metrics."""
    method = validate_config(cfg)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    # under torchrun / accelerate: a process per device, rank 0 writes (docs/distributed.md)
    created = eld.init_from_launcher(device)
    try:
        return _train_run(cfg, method, t_start, eld.local_device(device))
    finally:
        eld.end_process_group(created)


def _train_run(cfg: TrainConfig, method: str, t_start: float, device: torch.device) -> RunResult:
    main = eld.is_main_process()
    world = eld.world_info().world_size if eld.world_info().distributed else 1
    train_ds, test_ds = load_splits(cfg)
    seed_everything(cfg.seed)
    model, tokenizer, family = load_model(
        cfg.model, cfg.task, train_ds.num_labels or 2, train_ds.label_names
    )
    model.to(device)
    targets_given = cfg.target_modules or default_targets(model)

    steps_per_epoch = D.num_batches(len(train_ds), cfg.batch_size) // world  # per rank
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_ds)} training examples make no full batch per process; lower "
            "--batch-size or use more data"
        )
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)

    def train_batches(epoch: int):
        return eld.shard(
            D.iter_batches(
                tokenizer,
                train_ds,
                cfg.batch_size,
                cfg.max_length,
                cfg.task,
                shuffle=True,
                seed=cfg.seed + epoch,
            ),
            steps_per_epoch,
        )

    stage = Staging(Path(cfg.output), cfg.overwrite) if main else None
    try:
        times = {"probe_s": 0.0, "plan_s": 0.0}
        stats = plan = flex = None
        opts: dict[str, Any] = dict(cfg.options)
        heads = head_modules(model) if cfg.task == "classify" else {}
        init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
        if method in PEFT_METHODS:
            from .targets import find_targets

            names = list(find_targets(model, targets_given))
            if cfg.init_seed is not None:  # peft draws its factors from the global RNG
                torch.manual_seed(cfg.init_seed)
            model, opts = _build_peft(model, method, names, cfg, total)
            model.to(device)
            head_prefixes = ("modules_to_save", "original_module", *heads)
        else:
            import entrolora as el

            if cfg.plan:
                plan = el.AdaptationPlan.load(cfg.plan)
            else:
                if cfg.stats:
                    stats = el.GradientStats.load(cfg.stats)
                elif method not in MODEL_PLANNERS:
                    t0 = time.perf_counter()
                    stats = run_probe(model, tokenizer, train_ds, targets_given, cfg, device)
                    times["probe_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                plan = _make_plan(method, stats, model, targets_given, cfg)
                times["plan_s"] = time.perf_counter() - t0
            plan.validate(model)
            seed_everything(cfg.seed)
            model = el.apply(model, plan, dropout=cfg.dropout, seed=init_seed)
            for h in heads.values():
                h.requires_grad_(True)
            head_prefixes = tuple(heads)
            if method == "flexlora":
                ctrl = {k: v for k, v in opts.items() if k in FLEX_CONTROLLER_OPTIONS}
                flex = el.FlexLoRA(model, total_steps=total, seed=init_seed, **ctrl)
        adapter_params, head_params = _count(model, head_prefixes)

        # -- train
        seed_everything(cfg.seed)
        optimizer = _optimizer(model, method, cfg, opts)
        warmup = int(round(cfg.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))
        bar = _progress(total, method, cfg.progress and main)
        train_model = eld.wrap_ddp(model, device)
        step, losses, t0 = 0, [], time.perf_counter()
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for epoch in range(cfg.epochs):
            for batch in train_batches(epoch):
                if step >= total:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = train_model(**batch).loss
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"training loss became {float(loss)} at step {step}; lower --lr"
                    )
                full = loss + flex.regularizer() if flex is not None else loss
                full.backward()
                if flex is not None:
                    flex.step(step, optimizer)
                optimizer.step()
                if method == "adalora":
                    model.base_model.update_and_allocate(step)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                losses.append(loss.detach().item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        bar.close()
        times["train_s"] = time.perf_counter() - t0

        # -- evaluate
        t0 = time.perf_counter()
        test_batches = list(
            D.iter_batches(tokenizer, test_ds, cfg.eval_batch_size, cfg.max_length, cfg.task)
        )
        scores = evaluate(model, test_batches, cfg.task, device)
        times["eval_s"] = time.perf_counter() - t0
        mem, mem_kind = peak_memory(device)

        # -- write: rank 0 only; the others wait until the run folder is published
        if stage is None:
            eld.barrier()
            return RunResult(Path(cfg.output), dict(scores), plan, stats, None)
        out = stage.path
        history = [[s, r] for s, r in flex.history] if flex is not None else None
        max_rank = None
        if method in PEFT_METHODS:
            model.save_pretrained(str(out / "peft"))
        else:
            import entrolora as el

            if stats is not None:
                stats.save(out / "stats.safetensors", keep_gradients=cfg.keep_gradients)
            plan.save(out / "plan.json")
            el.save(model, out / "adapter", flex=flex) if flex is not None else el.save(
                model, out / "adapter"
            )
            head_state = {
                f"{hn}.{k}": v.detach().cpu()
                for hn, h in heads.items()
                for k, v in h.state_dict().items()
            }
            if head_state:
                from safetensors.torch import save_file

                save_file(
                    {k: v.contiguous() for k, v in head_state.items()},
                    str(out / "adapter" / "head.safetensors"),
                )
            info = el.export_peft(model, out / "peft")
            max_rank = getattr(info, "max_lora_rank", None)
            if head_state:
                _add_head_to_peft(out / "peft", head_state, list(heads))
            if history is not None:
                atomic_write_text(out / "flex_history.json", json.dumps(history) + "\n")
        times["total_s"] = time.perf_counter() - t_start
        metrics: dict[str, Any] = {
            "method": method,
            "task": cfg.task,
            "model": str(resolve_model(cfg.model)[0])
            if cfg.model not in (None, "default")
            else "default (all-MiniLM-L6-v2)",
            "model_family": family,
            "data": train_ds.source,
            "num_labels": train_ds.num_labels,
            "train_examples": len(train_ds),
            "test_examples": len(test_ds),
            **scores,
            "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            # entrolora methods: as the plan counts them (FlexLoRA: active directions, its
            # budget; LoRI: mask-kept entries); allocated_params: every adapter tensor element
            "trainable_params": (
                inject.num_trainable_params(model) if plan is not None else adapter_params
            ),
            "allocated_params": adapter_params,
            "head_params": head_params,
            "plan_params": plan.num_trainable_params() if plan is not None else None,
            "max_lora_rank": max_rank,
            "steps": step,
            "steps_per_s": step / times["train_s"] if times["train_s"] > 0 else None,
            **{k: round(v, 3) for k, v in times.items()},
            "stats_reused": bool(cfg.stats),
            "peak_memory_mib": round(mem, 1),
            "peak_memory_kind": mem_kind,
            "device": str(device),
            "torch_version": torch.__version__,
            "target_modules": sorted(plan.modules) if plan is not None else targets_given,
            "config": asdict(cfg),
        }
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
        if cfg.report:
            from .report import ReportInputs, write_report

            write_report(
                out,
                ReportInputs(
                    stats=stats, plan=plan, metrics=metrics, history=history, runs=[metrics]
                ),
                title=f"entrolora run: {method}",
            )
        published = stage.publish()
        eld.barrier()
    except BaseException:
        if stage is not None:
            stage.discard()
        raise
    return RunResult(published, metrics, plan, stats, history)


def run_probe(
    model: nn.Module,
    tokenizer: Any,
    train_ds: D.TextDataset,
    targets: list[str],
    cfg: TrainConfig,
    device: torch.device,
):
    """Probe ``model`` on up to ``cfg.probe_steps`` shuffled training batches (METHODS.md §1).

    The probe's loss is the task loss (``model(**batch).loss``); the model is in eval mode, so
    no dropout noise enters the statistics.
    """
    import entrolora as el

    model.eval()
    batches = []
    shuffled = D.iter_batches(
        tokenizer,
        train_ds,
        cfg.batch_size,
        cfg.max_length,
        cfg.task,
        shuffle=True,
        seed=cfg.seed - 1,
    )
    for b in shuffled:
        batches.append({k: v.to(device) for k, v in b.items()})
        if len(batches) == cfg.probe_steps:
            break
    # each rank probes its share of the same batches; the probe sums over ranks (METHODS.md §1)
    batches = list(eld.shard(batches))
    return el.probe(
        model,
        batches,
        targets,
        steps=len(batches),
        allow_fewer=True,
        progress=cfg.progress and eld.is_main_process(),
    )


def _make_plan(method: str, stats: Any, model: nn.Module, targets: list[str], cfg: TrainConfig):
    """Call ``entrolora.plan`` with the rank under the planner's own name (``r`` or ``r_ref``)."""
    from .planners import plan as make_plan
    from .planners import planner_options

    name = planner_name(method)
    known = planner_options(name)
    opts = {k: v for k, v in cfg.options.items() if k in known}
    for key in ("r", "r_ref"):
        if key in known and key not in opts:
            opts[key] = cfg.r
            break
    if stats is None:
        return make_plan(name, model, target_modules=targets, **opts)
    return make_plan(name, stats, **opts)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (loss, steps/s, ETA) or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"train {desc}", unit="step", dynamic_ncols=True)


# -- the demo -------------------------------------------------------------------------------------
DEMO_METHODS = ("lora", "e2lora", "ralora", "flexlora")
DEMO_MARKER = "demo.json"


def demo_run(
    base: TrainConfig, methods: Sequence[str] = DEMO_METHODS, output: str = "runs/demo"
) -> list[RunResult]:
    """Train each method with ``base``'s data, seed and budget into ``output/<method>``.

    The statistics are probed once (by the first method that needs them) and reused. A previous
    demo in ``output`` (it holds ``demo.json``) is replaced; any other content is refused unless
    ``base.overwrite``. Writes ``output/report.html`` comparing the runs.
    """
    out = Path(output)
    if holds_run(out) and not (base.overwrite or (out / DEMO_MARKER).is_file()):
        raise FileExistsError(
            f"output folder {str(out)!r} holds something that is not a demo; pass --overwrite or "
            "choose another --output"
        )
    methods = [normalize_method(m) for m in methods]
    stage = Staging(out, overwrite=True)
    results: list[RunResult] = []
    try:
        stats_path = base.stats
        for m in methods:
            cfg = TrainConfig(
                **{
                    **asdict(base),
                    "method": m,
                    "options": {},
                    "overwrite": False,
                    "output": str(stage.path / m),
                    "report": True,
                }
            )
            if m not in MODEL_PLANNERS and m not in PEFT_METHODS:
                cfg.stats = stats_path
            res = train_run(cfg)
            results.append(res)
            if stats_path is None and (res.output / "stats.safetensors").is_file():
                stats_path = str(res.output / "stats.safetensors")  # probe once, reuse
        from .report import ReportInputs, write_report

        write_report(
            stage.path,
            ReportInputs(runs=[r.metrics for r in results]),
            title="entrolora demo: " + ", ".join(methods),
        )
        atomic_write_text(
            stage.path / DEMO_MARKER,
            json.dumps({"methods": methods, "config": asdict(base)}, default=str),
        )
        stage.publish()
    except BaseException:
        stage.discard()
        raise
    return [RunResult(out / r.output.name, r.metrics, r.plan, r.stats, r.history) for r in results]


# -- export ---------------------------------------------------------------------------------------
def export_run(
    run: str | os.PathLike,
    output: str | os.PathLike,
    model: str | None = None,
    task: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Load a run's adapter (and head) onto its base model and write a stock peft checkpoint.

    ``run`` is a run folder or an adapter folder (holding ``plan.json``); the base model and task
    default to the ones recorded in the run's ``metrics.json``. Returns ``export_peft``'s info.
    """
    import entrolora as el

    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    adapter = run / "adapter" if (run / "adapter").is_dir() else run
    if not (adapter / "plan.json").is_file():
        if (run / "peft" / "adapter_config.json").is_file():
            raise ValueError(
                f"{str(run)!r} is a peft-baseline run: its peft/ folder already is a checkpoint"
            )
        raise ValueError(
            f"{str(run)!r} holds no adapter (no plan.json); pass a folder written by "
            "`entrolora train` or el.save"
        )
    recorded: dict[str, Any] = {}
    for folder in (run, adapter.parent):
        if (folder / "metrics.json").is_file():
            recorded = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            break
    rcfg = recorded.get("config", {})
    model = model if model is not None else rcfg.get("model")
    task = task or rcfg.get("task", "classify")
    if task not in D.TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(D.TASKS)}")
    out = check_output(output, overwrite)
    head_file = adapter / "head.safetensors"
    head: dict[str, torch.Tensor] = {}
    if head_file.is_file():
        from safetensors.torch import load_file

        head = load_file(str(head_file))
    num_labels = recorded.get("num_labels") or 2
    for k, v in head.items():
        if k.endswith(".weight") and v.dim() == 2:
            num_labels = int(v.shape[0])
    net, _, _ = load_model(model, task, num_labels)
    if head:
        missing = [k for k in head if k not in dict(net.named_parameters())]
        if missing:
            raise ValueError(
                f"the run's classifier head {missing[0]!r} does not exist in the base model; "
                "pass the --model the run was trained on"
            )
        net.load_state_dict(head, strict=False)
    net = el.load(net, adapter)
    stage = Staging(out, overwrite)
    try:
        info = el.export_peft(net, stage.path)
        if head:
            _add_head_to_peft(stage.path, head, sorted({k.split(".")[0] for k in head}))
        stage.publish()
    except BaseException:
        stage.discard()
        raise
    return info
