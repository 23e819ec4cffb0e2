"""``train_run(config)``: the job behind ``entrolora train``, one step per function.

probe (when the method needs statistics; or reuse ``config.stats``) → plan (or reuse
``config.plan``) → apply → train (AdamW, linear warm-up then linear decay, progress bar) →
evaluate on the held-out split → write the run folder (``write.py`` lists its files).

Classification trains the classifier head too (peft's ``modules_to_save`` semantics): after
``apply`` froze the base model, the head (``classifier`` / ``score``) is made trainable. The
peft baselines (peft-lora, dora, adalora, vera, lora-plus, eva, lora-ga, pissa) are built with
peft itself.

Everything is written into a staging folder next to the output and renamed at the end, so an
interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as eld
from ..data import datasets as D
from ..guards.staging import OutputFolder, check_output, check_room, resolve
from ..progress import progress_bar
from ..targets import ALL_LINEAR
from . import sft
from .baselines import build_peft
from .config import (
    FLEX_CONTROLLER_OPTIONS,
    MODEL_PLANNERS,
    PEFT_CALIBRATED,
    PEFT_METHODS,
    RunResult,
    TrainConfig,
    absolute_paths,
    validate_config,
)  # fmt: skip
from .loop import (
    count_params,
    evaluate,
    make_optimizer,
    peak_memory,
    seed_everything,
    train_steps,
)  # fmt: skip
from .models import default_targets, head_modules, load_model, resolve_device
from .probe import calibration_batches, make_plan, run_probe
from .state import Adapted, Job
from .write import run_bytes, write_run


def train_run(cfg: TrainConfig) -> RunResult:
    """Run the whole job described by ``cfg``; returns the published run folder and metrics.

    1. check the request and the output folder (nothing loads before);
    2. under torchrun / accelerate, join the process group (rank 0 writes, docs/distributed.md);
    3. load the data splits and the model (``prepare``);
    4. adapt: a peft baseline, or probe → plan → apply (``adapt``);
    5. train (``train``), then evaluate on the held-out split (``evaluate_run``);
    6. write the run folder into a staging folder and publish it with one rename (``write_run``).
    """
    cfg = absolute_paths(cfg)
    method = validate_config(cfg)
    check_output(cfg.output, cfg.overwrite, "run")  # before anything loads
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    created = eld.init_from_launcher(device)
    try:
        main = eld.is_main_process()
        folder = OutputFolder(cfg.output, "run", cfg.overwrite) if main else None
        with folder or contextlib.nullcontext():
            job = prepare(cfg, method, eld.local_device(device))
            adapted = adapt(job)
            losses = train(job, adapted)
            scores = evaluate_run(job, adapted)
            if folder is None:  # the other ranks wait until rank 0 has published
                eld.barrier()
                return RunResult(Path(cfg.output), dict(scores), adapted.plan, adapted.stats,
                                 None, losses)  # fmt: skip
            try:
                metrics, history = write_run(folder.path, job, adapted, losses, scores, t_start)
            except OSError as e:  # a full disk, a folder removed under us: say where things are
                raise folder.failed(e) from None
            published = folder.publish()
        eld.barrier()
        return RunResult(published, metrics, adapted.plan, adapted.stats, history, losses)
    finally:
        eld.end_process_group(created)


def load_splits(cfg: TrainConfig) -> tuple[D.TextDataset, D.TextDataset]:
    """Load, subset (``limit``) and split (by film for the default) the data; with
    ``full_test`` split first and subset the training side only (to ``limit``'s share)."""
    if cfg.task == "sft":
        return sft.load_sft_splits(cfg)
    ds = D.load_data(cfg.data, cfg.text_column, cfg.label_column, cfg.task, cfg.merge_labels)
    if cfg.full_test:
        train_ds, test_ds = D.split(ds, cfg.test_fraction, cfg.seed)
        if cfg.limit is not None:
            D.subset(ds, cfg.limit, cfg.seed)  # the same refusal of a limit below 2
            share = max(2, round(cfg.limit * (1 - cfg.test_fraction)))
            train_ds = D.subset(train_ds, share, cfg.seed)
    else:
        ds = D.subset(ds, cfg.limit, cfg.seed)
        train_ds, test_ds = D.split(ds, cfg.test_fraction, cfg.seed)
    if not len(train_ds) or not len(test_ds):
        raise ValueError("the train/test split left an empty side; use more data or --limit")
    return train_ds, test_ds


def as_used(cfg: TrainConfig, n_train: int, n_test: int, total: int) -> TrainConfig:
    """``cfg`` with ``limit`` and ``max_steps`` left out (None) when they did not act (issue 34:
    nothing recorded that differs from what was used): a limit above the rows there were (the
    training rows where only they are subset: ``full_test``, ``--task sft``), a step cap above
    the epochs' steps; one equal to them is kept, as it bound the run exactly. ``metrics.json``
    records the rows and steps used beside it."""
    drawn = n_train if cfg.full_test or cfg.task == "sft" else n_train + n_test
    share = cfg.limit
    if share is not None and cfg.full_test and cfg.task != "sft":
        share = max(2, round(share * (1 - cfg.test_fraction)))
    if share is not None and drawn < share:
        cfg = replace(cfg, limit=None)
    if cfg.max_steps is not None and total < cfg.max_steps:
        cfg = replace(cfg, max_steps=None)
    return cfg


def prepare(cfg: TrainConfig, method: str, device: torch.device) -> Job:
    """Load the data and the model onto ``device``; the per-rank step budget."""
    world = eld.world_info().world_size if eld.world_info().distributed else 1
    train_ds, test_ds = load_splits(cfg)
    D.check_split_sizes(train_ds, test_ds)  # before a score from one example is reported
    seed_everything(cfg.seed)
    model, tokenizer, family = load_model(
        cfg.model, cfg.task, train_ds.num_labels or 2, train_ds.label_names, cfg.max_length
    )
    model.to(device)
    if cfg.task == "sft":  # prompts through the chat template, answers closed by EOS
        train_ds, test_ds = sft.tokenize_splits(train_ds, test_ds, tokenizer, cfg)
    steps_per_epoch = D.num_batches(len(train_ds), cfg.batch_size) // world  # per rank
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_ds)} training examples make no full batch per process; lower "
            "--batch-size or use more data"
        )
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    cfg = as_used(cfg, len(train_ds), len(test_ds), total)
    # auto chooses among every linear layer of the stack (METHODS.md §7)
    default = [ALL_LINEAR] if method == "auto" else None
    targets = cfg.target_modules or default or default_targets(model)
    return Job(cfg, method, device, train_ds, test_ds, model, tokenizer, family, targets,
               steps_per_epoch, total)  # fmt: skip


def adapt(job: Job) -> Adapted:
    """Put the method's adapters into ``job.model``; the head stays trainable (classify)."""
    cfg = job.cfg
    heads = head_modules(job.model) if cfg.task == "classify" else {}
    if job.method in PEFT_METHODS:
        from ..targets import find_targets

        names = list(find_targets(job.model, job.targets))
        if cfg.init_seed is not None:  # peft draws its factors from the global RNG
            torch.manual_seed(cfg.init_seed)

        def batches() -> list[dict[str, torch.Tensor]]:  # EVA's and LoRA-GA's calibration
            return calibration_batches(job.tokenizer, job.train_ds, cfg, job.device)

        t0 = time.perf_counter()
        model, opts = build_peft(job.model, job.method, names, cfg, max(1, job.total), batches)
        if job.method in PEFT_CALIBRATED:  # their data pass is the probe's counterpart
            job.times["probe_s"] = time.perf_counter() - t0
        model.to(job.device)
        a = Adapted(model, opts, heads, ("modules_to_save", "original_module", *heads))
    else:
        a = _adapt_entrolora(job, heads)
    a.params = count_params(a.model, a.head_prefixes)
    if eld.is_main_process():  # the run's size is known now: is there room, before training?
        check_room(resolve(cfg.output), run_bytes(a, cfg.keep_gradients), cfg.output)
    return a


def _adapt_entrolora(job: Job, heads: dict[str, nn.Module]) -> Adapted:
    """Reuse or make the plan (probing first when the planner needs statistics), then apply."""
    import entrolora as el

    cfg, stats = job.cfg, None
    if cfg.plan:
        plan = el.AdaptationPlan.load(cfg.plan)
    else:
        if cfg.stats:
            stats = el.GradientStats.load(cfg.stats)
        elif job.method not in MODEL_PLANNERS:
            t0 = time.perf_counter()
            stats = run_probe(job.model, job.tokenizer, job.train_ds, job.targets, cfg, job.device)
            job.times["probe_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = make_plan(job.method, stats, job.model, job.targets, cfg)
        job.times["plan_s"] = time.perf_counter() - t0
    try:
        plan.validate(job.model)
    except ValueError as e:  # a reused plan: the message names its file
        raise ValueError(f"--plan {cfg.plan!r}: {e}" if cfg.plan else str(e)) from None
    stats = _calibration(job, plan, stats)
    init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
    seed_everything(cfg.seed)
    model = el.apply(
        job.model, plan, dropout=cfg.dropout, seed=init_seed, stats=stats,
        adapter_dtype=cfg.adapter_dtype,
    )  # fmt: skip
    for h in heads.values():
        h.requires_grad_(True)
    flex = None
    if job.method == "flexlora":
        ctrl = {k: v for k, v in cfg.options.items() if k in FLEX_CONTROLLER_OPTIONS}
        # max(1, ·): sft's --max-steps 0 scores the untrained model, but schedules need a step
        flex = el.FlexLoRA(model, total_steps=max(1, job.total), seed=init_seed, **ctrl)
    return Adapted(model, dict(cfg.options), heads, tuple(heads), plan, stats, flex)


def _calibration(job: Job, plan: Any, stats: Any) -> Any:
    """``stats``, or statistics probed now when what ``apply`` builds from the probe's gradients
    needs gradients that a reused plan came without: E²LoRI's magnitude masks (``-o
    mask=random`` needs none) and auto's ``init=gradient`` (METHODS.md §7)."""
    lori = any(m.kind == "lori" for m in plan.modules.values())
    if lori:  # recorded in plan.json, so that the run says how its masks were made
        plan.options["mask"] = job.cfg.options.get("mask", plan.options.get("mask", "magnitude"))
    what = None
    if lori and plan.options["mask"] == "magnitude":
        what = "E²LoRI's magnitude mask"
    elif plan.options.get("init") == "gradient":
        what = "init=gradient"
    if what is None or (stats is not None and stats.gradients is not None):
        return stats
    if job.cfg.stats:
        fix = "pass -o mask=random" if lori else "plan with -o init=lora"
        raise ValueError(
            f"{what} needs the probed gradients, which statistics file {job.cfg.stats!r} does "
            f"not hold; write it with --keep-gradients, or {fix}"
        )
    t0 = time.perf_counter()
    names = sorted(plan.modules)
    stats = run_probe(job.model, job.tokenizer, job.train_ds, names, job.cfg, job.device)
    job.times["probe_s"] += time.perf_counter() - t0
    return stats


def train(job: Job, a: Adapted) -> list[float]:
    """Train ``a.model`` for ``job.total`` steps (DDP when distributed); the loss of each step."""
    cfg = job.cfg
    seed_everything(cfg.seed)
    optimizer, scheduler = make_optimizer(a.model, job.method, cfg, a.opts, job.total)
    after_step = a.model.base_model.update_and_allocate if job.method == "adalora" else None

    def epoch_batches(epoch: int):
        if cfg.task == "sft":  # grouped by length: padding is most of the cost on short answers
            pad = job.tokenizer.pad_token_id
            batches = sft.train_batches(job.train_ds, cfg.batch_size, cfg.seed + epoch, pad)
            return eld.shard(batches, job.steps_per_epoch)
        batches = D.iter_batches(job.tokenizer, job.train_ds, cfg.batch_size, cfg.max_length,
                                 cfg.task, shuffle=True, seed=cfg.seed + epoch)  # fmt: skip
        return eld.shard(batches, job.steps_per_epoch)

    batches = itertools.chain.from_iterable(epoch_batches(e) for e in range(cfg.epochs))
    bar = progress_bar(job.total, f"train {job.method}", cfg.progress and eld.is_main_process())
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    t0 = time.perf_counter()
    losses = train_steps(eld.wrap_ddp(a.model, job.device), batches, job.total, optimizer,
                         scheduler, job.device, a.flex, after_step, bar)  # fmt: skip
    bar.close()
    job.times["train_s"] = time.perf_counter() - t0
    return losses


def evaluate_run(job: Job, a: Adapted) -> dict[str, Any]:
    """Held-out scores of the trained model (``loop.evaluate``)."""
    cfg = job.cfg
    t0 = time.perf_counter()
    if cfg.task == "sft":
        scores = sft.evaluate_sft(a.model, job.test_ds, cfg.eval_batch_size, job.device,
                                  job.tokenizer.pad_token_id)  # fmt: skip
        job.times["eval_s"] = time.perf_counter() - t0
        job.memory = peak_memory(job.device)
        return scores
    held_out = D.by_length(job.tokenizer, job.test_ds, cfg.max_length)
    test_batches = list(
        D.iter_batches(job.tokenizer, held_out, cfg.eval_batch_size, cfg.max_length, cfg.task)
    )
    total = sum(int(b["labels"].shape[0]) for b in test_batches)
    show = cfg.progress and eld.is_main_process()
    with progress_bar(total, f"eval {job.method}", show, unit="example") as bar:
        scores = evaluate(a.model, test_batches, cfg.task, job.device, bar)
    job.times["eval_s"] = time.perf_counter() - t0
    job.memory = peak_memory(job.device)
    return scores
