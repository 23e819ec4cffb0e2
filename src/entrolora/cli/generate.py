"""``entrolora generate``: answers from a trained run (or its peft export), greedy by default."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import Debug, Device, app, guarded


@app.command(
    epilog="Examples:\n\n"
    '  entrolora generate runs/sft --prompt "What is 7*8?"\n\n'
    "  entrolora generate runs/sft/peft --data questions.jsonl --output answers.jsonl\n\n"
    '  entrolora generate my-peft-export --model ./my-llama --prompt "Hello" '
    "--max-new-tokens 32"
)
@guarded
def generate(
    run: Annotated[str, typer.Argument(help="Run folder, its adapter/ or a peft export folder.")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="File of prompts (CSV/TSV/JSONL/Parquet).")
    ] = None,
    prompt_column: Annotated[
        str, typer.Option("--prompt-column", help="Column of prompts in --data.")
    ] = "prompt",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")
    ] = 64,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Base model; default: the run's, or the export's."),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option("--chat-template", help="auto or none; default: as the run was trained."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per batch.")] = 16,
    output: Annotated[
        str | None, typer.Option("--output", help="Write JSON Lines {prompt, answer} here.")
    ] = None,
    device: Device = "cpu",
    debug: Debug = False,
) -> None:
    """Answer prompts with a trained adapter, greedily, through the run's chat template."""
    from ..files import atomic_write_text
    from ..job.generate import generate as answer
    from ..job.generate import load_answerer, read_prompts

    if bool(prompt) == bool(data):
        raise ValueError("pass --prompt TEXT (repeatable) or --data FILE, one of the two")
    prompts = list(prompt) if prompt else read_prompts(data, prompt_column)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    a = load_answerer(run, model, chat_template, device)
    answers = answer(a, prompts, max_new_tokens, batch_size)
    lines = [json.dumps({"prompt": p, "answer": x}, ensure_ascii=False)
             for p, x in zip(prompts, answers)]  # fmt: skip
    if output:
        atomic_write_text(output, "".join(line + "\n" for line in lines))
        typer.echo(f"{len(answers)} answers written to {output}")
    elif data:
        typer.echo("\n".join(lines))
    else:
        typer.echo("\n".join(answers))
