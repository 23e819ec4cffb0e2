"""``entrolora probe`` and ``entrolora plan``: statistics and plans without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    BatchSize,
    BudgetOpt,
    DataOpt,
    Debug,
    Device,
    KeepGradients,
    LabelCol,
    Limit,
    MaxLength,
    MergeLabels,
    MethodOpt,
    ModelOpt,
    OptionOpt,
    Overwrite,
    ProbeHead,
    ProbeSteps,
    Quiet,
    ROpt,
    Seed,
    TargetsOpt,
    Task,
    TextCol,
    app,
    console,
    guarded,
    target_list,
    with_budget,
)  # fmt: skip


# -- probe --------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora probe --output stats.safetensors\n\n"
    "  entrolora probe --model ./my-llama --data train.jsonl --task causal-lm "
    "--target-modules q_proj,v_proj --probe-steps 64"
)
@guarded
def probe(
    model: ModelOpt = None,
    data: DataOpt = None,
    text_column: TextCol = "text",
    label_column: LabelCol = "label",
    merge_labels: MergeLabels = False,
    task: Task = "classify",
    target_modules: TargetsOpt = None,
    probe_steps: ProbeSteps = 64,
    probe_head: ProbeHead = "centroid",
    batch_size: BatchSize = 32,
    max_length: MaxLength = 64,
    seed: Seed = 0,
    limit: Limit = None,
    device: Device = "auto",
    output: Annotated[str, typer.Option("--output", help="Statistics file to write.")] = (
        "stats.safetensors"
    ),
    overwrite: Overwrite = False,
    keep_gradients: KeepGradients = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Probe gradients on training batches; write statistics and print a per-type summary."""
    from ..job import (
        TrainConfig,
        check_output,
        check_probe_head,
        default_targets,
        load_model,
        load_splits,
        resolve_device,
        run_probe,
    )  # fmt: skip

    out = check_output(output, overwrite, "stats")  # before the probe runs
    cfg = TrainConfig(
        model=model, data=data, text_column=text_column, label_column=label_column, task=task,
        merge_labels=merge_labels, probe_steps=probe_steps, probe_head=probe_head,
        batch_size=batch_size,
        max_length=max_length, seed=seed, limit=limit, device=device, progress=not quiet,
    )  # fmt: skip
    check_probe_head(cfg.probe_head)
    dev = resolve_device(device)
    train_ds, test_ds = load_splits(cfg)
    if task == "sft" and model is None:
        model = cfg.model = "smollm2"  # the sft default: a causal LM
    net, tokenizer, _ = load_model(model, task, train_ds.num_labels or 2, train_ds.label_names)
    if task == "sft":  # the training loss: answers only, prompts through the chat template
        from ..job.sft import tokenize_splits

        train_ds, _ = tokenize_splits(train_ds, test_ds.take([]), tokenizer, cfg)
    net.to(dev)
    targets = target_list(target_modules) or default_targets(net)
    stats = run_probe(net, tokenizer, train_ds, targets, cfg, dev, report=False)
    stats.save(out, keep_gradients=keep_gradients)
    console().print(_stats_table(stats))
    warning = stats.low_snr_warning()
    if warning:
        console().print(warning, soft_wrap=True)
    console().print(f"statistics written to {out}")


def _stats_table(stats: Any):
    from rich.table import Table

    from ..report import short_type

    table = Table(title=f"gradient statistics ({stats.steps} probe steps)")
    for col in ("module type", "layers", "entropy min", "entropy mean", "entropy max",
                "erank mean", "SNR median", "degenerate"):  # fmt: skip
        table.add_column(col, justify="left" if col == "module type" else "right")
    snr = stats.snr_by_type()  # {} without a noise estimate (one batch)
    for mtype, names in stats.types.items():
        ent = [stats[n].entropy for n in names if stats[n].entropy is not None]
        er = [stats[n].erank for n in names if stats[n].erank is not None]
        deg = sum(stats[n].degenerate for n in names)
        table.add_row(
            short_type(mtype), str(len(names)),
            *(f"{v:.3f}" for v in ((min(ent), sum(ent) / len(ent), max(ent)) if ent
                                   else (float("nan"),) * 3)),
            f"{sum(er) / len(er):.1f}" if er else "-",
            f"{snr[mtype]:.2f}" if mtype in snr else "-", str(deg),
        )  # fmt: skip
    return table


# -- plan ---------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora plan stats.safetensors --method e2lora --r 8 --output plan.json\n\n"
    "  entrolora plan stats.safetensors --method ralora -o n_max=16\n\n"
    "  entrolora plan --model ./my-llama --method lora --target-modules q_proj,v_proj\n\n"
    "  entrolora probe --target-modules all-linear --output all.safetensors\n\n"
    "  entrolora plan all.safetensors --method auto --budget like-lora=8"
)
@guarded
def plan(
    stats: Annotated[
        str | None, typer.Argument(help="Statistics file from `entrolora probe`.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Plan from the model instead (lora, sharelora, "
            "flexlora only); 'default' for the embedded MiniLM.",
        ),
    ] = None,  # fmt: skip
    method: MethodOpt = "e2lora",
    r: ROpt = 8,
    option: OptionOpt = None,
    budget: BudgetOpt = None,
    target_modules: TargetsOpt = None,
    task: Task = "classify",
    output: Annotated[str, typer.Option("--output", help="Plan file to write.")] = "plan.json",
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Make an adaptation plan from statistics (or a model) and print its summary."""
    from ..job import (
        PEFT_METHODS,
        TrainConfig,
        check_options,
        check_output,
        normalize_method,
        parse_options,
    )  # fmt: skip

    meth = normalize_method(method)
    if meth in PEFT_METHODS:
        raise ValueError(f"{meth} is a peft baseline without a plan; use `entrolora train`")
    opts = with_budget(parse_options(option or []), budget, meth)
    check_options(meth, opts)
    out = check_output(output, overwrite, "plan")
    cfg = TrainConfig(method=meth, r=r, options=opts, task=task)
    result = _plan_from(cfg, stats, model, target_list(target_modules))
    result.save(out)
    typer.echo(result.summary())
    typer.echo(f"plan written to {out}")


def _plan_from(cfg: Any, stats: str | None, model: str | None, targets: list[str] | None) -> Any:
    """The plan of ``cfg.method`` from a statistics file, or from a model (model planners)."""
    from ..job import MODEL_PLANNERS, default_targets, load_model, make_plan

    meth = cfg.method
    if stats is not None:
        from ..stats import GradientStats

        if not Path(stats).is_file():
            raise FileNotFoundError(
                f"statistics file {stats!r} does not exist; run `entrolora probe`"
            )
        return make_plan(meth, GradientStats.load(stats), None, [], cfg)
    if model is None:
        raise ValueError("pass a statistics file (`entrolora probe` writes one) or --model")
    if meth not in MODEL_PLANNERS:
        raise ValueError(
            f"{meth} plans from gradient statistics; pass a stats file from `entrolora probe` "
            f"(only {', '.join(MODEL_PLANNERS)} plan from --model)"
        )
    net, _, _ = load_model(None if model == "default" else model, cfg.task)
    return make_plan(meth, None, net, targets or default_targets(net), cfg)
