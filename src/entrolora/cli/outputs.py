"""``entrolora report`` and ``entrolora export``: figures and stock checkpoints from runs."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import Debug, Overwrite, app, guarded


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
    from ..report import gather, write_report

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
    from ..job import export_run

    info = export_run(run, output, model=model, task=task, overwrite=overwrite)
    rank = getattr(info, "max_lora_rank", None)
    typer.echo(
        f"peft checkpoint written to {output}" + (f" (max_lora_rank {rank})" if rank else "")
    )
