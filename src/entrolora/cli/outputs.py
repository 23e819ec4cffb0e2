"""``entrolora report`` and ``entrolora export``: figures and stock checkpoints from runs."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import Debug, Overwrite, app, guarded


# -- report -------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora report runs/e2lora                     # one run\n\n"
    "  entrolora report runs/demo --output compare      # a demo's runs side by side\n\n"
    "  entrolora report runs/lora runs/e2lora --output compare\n\n"
    "  entrolora report stats.safetensors plan.json"
)
@guarded
def report(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Run folders (several: side by side; a demo folder: its runs), a stats "
            ".safetensors and/or a plan .json."
        ),
    ],
    output: Annotated[str, typer.Option("--output", help="Folder for report.html + PNGs.")] = (
        "report"
    ),
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Figures and report.html from statistics, a plan or run folder(s)."""
    from ..guards.staging import OutputFolder
    from ..report import gather, write_report

    inputs = gather(paths)
    with OutputFolder(output, "report", overwrite) as folder:  # never into a run's folder
        name = write_report(folder.path, inputs, link_from=output).name
        html = folder.publish() / name
    typer.echo(f"report written to {html}")


# -- export -------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora export runs/e2lora --output e2lora-peft\n\n"
    "  entrolora export runs/e2lora --output e2lora-merged --merged\n\n"
    "  entrolora export runs/e2lora --output base-hf --hf-base   # the base alone\n\n"
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
        str | None, typer.Option("--task", help="classify, causal-lm or sft; default: the run's.")
    ] = None,
    output: Annotated[str, typer.Option("--output", help="peft checkpoint folder.")] = "peft",
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="uniform: one rank, zero-padded, right in peft, vLLM and llama.cpp; compact: "
            "each module's own rank, smaller, right in peft and vLLM, WRONG in llama.cpp.",
        ),
    ] = "uniform",
    merged: Annotated[
        bool, typer.Option("--merged", help="Full HF model folder with the adapter folded in.")
    ] = False,
    hf_base: Annotated[
        bool,
        typer.Option(
            "--hf-base",
            help="Flag: write the HF-format base model alone into --output (what vLLM and "
            "llama.cpp load the adapter onto; offline loading for peft too).",
        ),
    ] = False,
    overwrite: Overwrite = False,
    debug: Debug = False,
) -> None:
    """Export a trained adapter as a stock peft LoRA checkpoint (or a merged / base HF model)."""
    from ..job import export_run

    info = export_run(run, output, model=model, task=task, overwrite=overwrite,
                      layout=layout, merged=merged, hf_base=hf_base)  # fmt: skip
    if merged or hf_base:
        what = "merged model (adapter folded in)" if merged else "HF-format base model"
        typer.echo(f"{what} written to {output}; loads with AutoModelFor*.from_pretrained")
        return
    typer.echo(f"peft checkpoint written to {output}: {info.summary()}")
    for note in info.notes:
        typer.echo(f"note: {note}")
