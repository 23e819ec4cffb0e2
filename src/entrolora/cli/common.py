"""What every ``entrolora`` command shares: the Typer app, common options, the error guard
(one line, exit status 1; ``--debug`` shows the traceback) and the results table."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
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
MergeLabels = Annotated[
    bool,
    typer.Option(
        "--merge-labels",
        help="Treat labels that differ only by case or spacing (pos, Pos, 'pos ') as one class "
        "(without it such labels are refused).",
    ),
]
Task = Annotated[
    str,
    typer.Option(
        "--task", help="classify (sequence classification), causal-lm or sft (prompt → answer)."
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="lora, sharelora, e2lora, e2sharelora, e2dora, e2vera, e2lori, ralora, ralora-pro, "
        "ls-lora, lora-gid, flexlora, auto; peft baselines: peft-lora, dora, adalora, vera, "
        "lora-plus, eva, lora-ga, pissa.",
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
        help="Comma-separated module suffixes, or all-linear (every linear layer of the layer "
        "stack); default by model family (BERT: attention.self.query/key/value, "
        "attention.output.dense; Llama: q,k,v,o_proj), all-linear for --method auto.",
    ),
]
ProbeSteps = Annotated[int, typer.Option("--probe-steps", help="Calibration batches to probe.")]
ProbeHead = Annotated[
    str,
    typer.Option(
        "--probe-head",
        help="classify: the head the probe reads gradients through. centroid (default): the "
        "output layer along the centred class means of its input, the same for every seed; "
        "model: the head as loaded (a fresh random one per seed, the papers' reading).",
    ),
]
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
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="auto: trainable parameters, as a count (300000), a fraction of the model (0.01) "
        "or like-lora=R, LoRA at rank R on the family's default targets (default: "
        "like-lora=<--r>).",
    ),
]
KeepGradients = Annotated[
    bool,
    typer.Option(
        "--keep-gradients",
        help="Save the probed gradients and their noise estimates in the statistics file, so "
        "that a later --stats run can use the cosine, L1 or L2 similarity.",
    ),
]


def one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split()) or type(e).__name__
    return msg


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; any error becomes one line on stderr and exit status 1 (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..guards.staging import terminate_as_exit

        debug = kwargs.get("debug", False) or os.environ.get("ENTROLORA_DEBUG") == "1"
        try:
            with terminate_as_exit():  # SIGTERM cleans up half-written outputs as Ctrl-C does
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if debug:
                raise
            from ..guards.output import OutputError

            known = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
                     ImportError, KeyError, OutputError)  # fmt: skip
            hint = "" if isinstance(e, known) else " (run with --debug for the traceback)"
            typer.echo(f"error: {one_line(e)}{hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def target_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--target-modules is empty; name modules, e.g. q_proj,v_proj")
    return names


def with_budget(options: dict, budget: str | None, method: str) -> dict:
    """``options`` with ``--budget`` as the auto planner's ``budget`` option."""
    if budget is None:
        return options
    if method.strip().lower() != "auto":
        raise ValueError(f"--budget applies to --method auto only, not {method}; drop it")
    if "budget" in options:
        raise ValueError("pass the budget once: --budget or -o budget=..., not both")
    from ..job import parse_value

    return {**options, "budget": parse_value(budget)}


def console():
    from rich.console import Console

    return Console()


def metrics_table(rows: list[dict], title: str):
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
