"""The ``entrolora`` command line: train, demo, probe, plan, report, export.

Errors print one line naming the fix and exit with status 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="entrolora",
    help="Decide where LoRA capacity goes from the model's own gradients, then train it.\n\n"
    "Start with `entrolora demo`, then `entrolora train --model DIR --data FILE.csv`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# -- shared options ---------------------------------------------------------------------------
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="Local Hugging Face model folder; 'smollm2' for the embedded SmolLM2 (GGUF); "
        "default: the embedded all-MiniLM-L6-v2.",
    ),
]  # fmt: skip
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", "-d",
        help="CSV/TSV/JSONL/Parquet file; default: the embedded Rotten Tomatoes snippets.",
    ),
]  # fmt: skip
TextCol = Annotated[str, typer.Option("--text-column", help="Column holding the text.")]
LabelCol = Annotated[str, typer.Option("--label-column", help="Column holding the label.")]
Task = Annotated[
    str, typer.Option("--task", help="classify (sequence classification) or causal-lm.")
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="lora, sharelora, e2lora, e2sharelora, e2dora, e2vera, e2lori, ralora, ralora-pro, "
        "ls-lora, lora-gid, flexlora; peft baselines: peft-lora, dora, adalora, vera, lora-plus.",
    ),
]
ROpt = Annotated[int, typer.Option("--r", help="LoRA rank (r_ref for ralora-pro).")]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Method option key=value (repeatable), e.g. n_max=16."),
]
TargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--target-modules",
        help="Comma-separated module suffixes; default by model family (BERT: "
        "attention.self.query/key/value, attention.output.dense; Llama: q,k,v,o_proj).",
    ),
]
ProbeSteps = Annotated[int, typer.Option("--probe-steps", help="Calibration batches to probe.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Examples per batch.")]
MaxLength = Annotated[int, typer.Option("--max-length", help="Tokens per example (truncation).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (data order, init, split).")]
Limit = Annotated[
    int | None, typer.Option("--limit", help="Use a seeded random subset of this many examples.")
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace an output that already exists.")
]


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split()) or type(e).__name__
    return msg


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; any error becomes one line on stderr and exit status 1 (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("ENTROLORA_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if debug:
                raise
            known = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError,
                     KeyError)  # fmt: skip
            hint = "" if isinstance(e, known) else " (run with --debug for the traceback)"
            typer.echo(f"error: {_one_line(e)}{hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _targets(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--target-modules is empty; name modules, e.g. q_proj,v_proj")
    return names


def _console():
    from rich.console import Console

    return Console()


def _metrics_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("method", "left"), ("accuracy", "right"), ("eval loss", "right"),
                         ("trainable params", "right"), ("probe s", "right"),
                         ("train s", "right"), ("total s", "right")):  # fmt: skip
        table.add_column(col, justify=justify)
    for m in rows:
        acc = m.get("accuracy")
        probe = "reused" if m.get("stats_reused") else f"{m.get('probe_s', 0):.1f}"
        table.add_row(
            str(m["method"]),
            "-" if acc is None else f"{100 * acc:.2f} %",
            f"{m['eval_loss']:.4f}",
            f"{m['trainable_params']:,}",
            probe,
            f"{m['train_s']:.1f}",
            f"{m['total_s']:.1f}",
        )
    return table


# -- train --------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora train                                  # E²LoRA, embedded MiniLM + reviews\n\n"
    "  entrolora train --method ralora --r 8 --limit 2000 --output runs/ralora\n\n"
    "  entrolora train --model ./my-bert --data reviews.csv --text-column review "
    "--label-column stars --method e2lora -o threshold=0.85\n\n"
    "  entrolora train --model smollm2 --task causal-lm --method flexlora --max-steps 50"
)
@guarded
def train(
    model: ModelOpt = None,
    data: DataOpt = None,
    text_column: TextCol = "text",
    label_column: LabelCol = "label",
    task: Task = "classify",
    method: MethodOpt = "e2lora",
    r: ROpt = 8,
    option: OptionOpt = None,
    target_modules: TargetsOpt = None,
    probe_steps: ProbeSteps = 64,
    stats: Annotated[
        str | None, typer.Option("--stats", help="Reuse a statistics file (skip the probe).")
    ] = None,
    keep_gradients: Annotated[
        bool,
        typer.Option(
            "--keep-gradients",
            help="Save the probed gradients in stats.safetensors, so that a later --stats run "
            "can use the cosine, L1 or L2 similarity.",
        ),
    ] = False,
    plan: Annotated[
        str | None, typer.Option("--plan", help="Reuse a plan.json (skip probe and planner).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training split.")] = 2,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.")
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.")] = 2e-3,
    batch_size: BatchSize = 32,
    max_length: MaxLength = 64,
    seed: Seed = 0,
    init_seed: Annotated[
        int | None,
        typer.Option(
            "--init-seed",
            help="Seed of the adapters' initial factors only (default: --seed); vary it to "
            "measure how much of a result the initialisation explains.",
        ),
    ] = None,
    limit: Limit = None,
    device: Device = "auto",
    output: Annotated[str, typer.Option("--output", help="Run folder to write.")] = "runs/run",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Probe, plan, apply, train and evaluate; write metrics, adapter, peft export and report."""
    from .train import TrainConfig, parse_options, train_run

    cfg = TrainConfig(
        model=model, data=data, text_column=text_column, label_column=label_column, task=task,
        method=method, r=r, options=parse_options(option or []),
        target_modules=_targets(target_modules), probe_steps=probe_steps, stats=stats,
        keep_gradients=keep_gradients, plan=plan, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, max_length=max_length, seed=seed, init_seed=init_seed, limit=limit,
        device=device, output=output, overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    result = train_run(cfg)
    from .distributed import is_main_process

    if not is_main_process():  # under torchrun / accelerate: rank 0 reports
        return
    con = _console()
    con.print(_metrics_table([result.metrics], f"entrolora train: {result.metrics['method']}"))
    con.print(f"run written to {result.output} (open {result.output / 'report.html'})")


# -- demo ---------------------------------------------------------------------------------------
DEMO_LIMIT = 3000


@app.command(
    epilog="Examples:\n\n"
    "  entrolora demo                      # subset, under 10 minutes on 2 CPU cores\n\n"
    "  entrolora demo --full --epochs 2    # all 12,808 reviews"
)
@guarded
def demo(
    full: Annotated[bool, typer.Option("--full", help="Use all the data, not a subset.")] = False,
    limit: Limit = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training split.")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Cap on steps.")] = None,
    method: Annotated[
        list[str] | None, typer.Option("--method", help="Methods to compare (repeatable).")
    ] = None,
    r: ROpt = 8,
    probe_steps: ProbeSteps = 32,
    model: ModelOpt = None,
    data: DataOpt = None,
    text_column: TextCol = "text",
    label_column: LabelCol = "label",
    batch_size: BatchSize = 32,
    max_length: MaxLength = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.")] = 2e-3,
    seed: Seed = 0,
    device: Device = "auto",
    output: Annotated[str, typer.Option("--output", help="Demo folder.")] = "runs/demo",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """LoRA, E²LoRA, RaLoRA and FlexLoRA on the embedded default, same seed and budget."""
    from .train import DEMO_METHODS, TrainConfig, demo_run

    if full and limit is not None:
        raise ValueError("--full and --limit contradict each other; pass one")
    base = TrainConfig(
        model=model, data=data, text_column=text_column, label_column=label_column, r=r,
        probe_steps=probe_steps, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, max_length=max_length, seed=seed, device=device,
        limit=None if full else (limit or DEMO_LIMIT), overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    results = demo_run(base, method or DEMO_METHODS, output)
    con = _console()
    rows = [r_.metrics for r_ in results]
    first = rows[0]
    con.print(
        _metrics_table(
            rows,
            f"entrolora demo: {first['train_examples']:,} train / {first['test_examples']:,} "
            f"held-out examples, r={r}, seed {seed}",
        )
    )
    con.print(f"report: {Path(output) / 'report.html'}")


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
    task: Task = "classify",
    target_modules: TargetsOpt = None,
    probe_steps: ProbeSteps = 64,
    batch_size: BatchSize = 32,
    max_length: MaxLength = 64,
    seed: Seed = 0,
    limit: Limit = None,
    device: Device = "auto",
    output: Annotated[str, typer.Option("--output", help="Statistics file to write.")] = (
        "stats.safetensors"
    ),
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Probe gradients on training batches; write statistics and print a per-type summary."""
    from .train import (
        TrainConfig,
        default_targets,
        load_model,
        load_splits,
        resolve_device,
        run_probe,
    )  # fmt: skip

    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{output!r} already exists; pass --overwrite or another --output")
    cfg = TrainConfig(
        model=model, data=data, text_column=text_column, label_column=label_column, task=task,
        probe_steps=probe_steps, batch_size=batch_size, max_length=max_length, seed=seed,
        limit=limit, device=device, progress=not quiet,
    )  # fmt: skip
    dev = resolve_device(device)
    train_ds, _ = load_splits(cfg)
    net, tokenizer, _ = load_model(model, task, train_ds.num_labels or 2, train_ds.label_names)
    net.to(dev)
    targets = _targets(target_modules) or default_targets(net)
    stats = run_probe(net, tokenizer, train_ds, targets, cfg, dev)
    stats.save(out)
    _console().print(_stats_table(stats))
    _console().print(f"statistics written to {out}")


def _stats_table(stats: Any):
    from rich.table import Table

    from .report import short_type

    table = Table(title=f"gradient statistics ({stats.steps} probe steps)")
    for col in ("module type", "layers", "entropy min", "entropy mean", "entropy max",
                "erank mean", "degenerate"):  # fmt: skip
        table.add_column(col, justify="left" if col == "module type" else "right")
    for mtype, names in stats.types.items():
        ent = [stats[n].entropy for n in names if stats[n].entropy is not None]
        er = [stats[n].erank for n in names if stats[n].erank is not None]
        deg = sum(stats[n].degenerate for n in names)
        table.add_row(
            short_type(mtype), str(len(names)),
            *(f"{v:.3f}" for v in ((min(ent), sum(ent) / len(ent), max(ent)) if ent
                                   else (float("nan"),) * 3)),
            f"{sum(er) / len(er):.1f}" if er else "-", str(deg),
        )  # fmt: skip
    return table


# -- plan ---------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora plan stats.safetensors --method e2lora --r 8 --output plan.json\n\n"
    "  entrolora plan stats.safetensors --method ralora -o n_max=16\n\n"
    "  entrolora plan --model ./my-llama --method lora --target-modules q_proj,v_proj"
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
    target_modules: TargetsOpt = None,
    task: Task = "classify",
    output: Annotated[str, typer.Option("--output", help="Plan file to write.")] = "plan.json",
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Make an adaptation plan from statistics (or a model) and print its summary."""
    from .train import (
        MODEL_PLANNERS,
        PEFT_METHODS,
        TrainConfig,
        _make_plan,
        check_options,
        default_targets,
        load_model,
        normalize_method,
        parse_options,
    )  # fmt: skip

    meth = normalize_method(method)
    if meth in PEFT_METHODS:
        raise ValueError(f"{meth} is a peft baseline without a plan; use `entrolora train`")
    opts = parse_options(option or [])
    check_options(meth, opts)
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{output!r} already exists; pass --overwrite or another --output")
    cfg = TrainConfig(method=meth, r=r, options=opts)
    if stats is not None:
        from .stats import GradientStats

        if not Path(stats).is_file():
            raise FileNotFoundError(
                f"statistics file {stats!r} does not exist; run `entrolora probe`"
            )
        result = _make_plan(meth, GradientStats.load(stats), None, [], cfg)
    elif model is not None:
        if meth not in MODEL_PLANNERS:
            raise ValueError(
                f"{meth} plans from gradient statistics; pass a stats file from `entrolora probe` "
                f"(only {', '.join(MODEL_PLANNERS)} plan from --model)"
            )
        net, _, _ = load_model(None if model == "default" else model, task)
        targets = _targets(target_modules) or default_targets(net)
        result = _make_plan(meth, None, net, targets, cfg)
    else:
        raise ValueError("pass a statistics file (`entrolora probe` writes one) or --model")
    result.save(out)
    typer.echo(result.summary())
    typer.echo(f"plan written to {out}")


# -- report -------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora report runs/e2lora                     # one run\n\n"
    "  entrolora report runs/demo/* --output compare    # accuracy vs parameters\n\n"
    "  entrolora report stats.safetensors plan.json"
)
@guarded
def report(
    paths: Annotated[
        list[str], typer.Argument(help="Run folders, a stats .safetensors and/or a plan .json.")
    ],
    output: Annotated[str, typer.Option("--output", help="Folder for report.html + PNGs.")] = (
        "report"
    ),
    debug: Debug = False,
) -> None:
    """Figures and report.html from statistics, a plan or run folder(s)."""
    from .report import gather, write_report

    inputs = gather(paths)
    html = write_report(output, inputs)
    typer.echo(f"report written to {html}")


# -- export -------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora export runs/e2lora --output e2lora-peft\n\n"
    "  entrolora export my-adapter/ --model ./my-llama --task causal-lm --output peft-out"
)
@guarded
def export(
    run: Annotated[str, typer.Argument(help="Run folder (or its adapter/ folder).")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Base model; default: the one the run used."),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="classify or causal-lm; default: the run's.")
    ] = None,
    output: Annotated[str, typer.Option("--output", help="peft checkpoint folder.")] = "peft",
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Export a trained adapter as a stock peft LoRA checkpoint (loads with PeftModel)."""
    from .train import export_run

    info = export_run(run, output, model=model, task=task, overwrite=overwrite)
    rank = getattr(info, "max_lora_rank", None)
    typer.echo(
        f"peft checkpoint written to {output}" + (f" (max_lora_rank {rank})" if rank else "")
    )


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
