"""``entrolora train`` and ``entrolora demo``: the training job from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    metrics_table,
    target_list,
    with_budget,
)

StatsFile = Annotated[
    str | None, typer.Option("--stats", help="Reuse a statistics file (skip the probe).")
]
PlanFile = Annotated[
    str | None, typer.Option("--plan", help="Reuse a plan.json (skip probe and planner).")
]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the training split.")]
MaxSteps = Annotated[
    int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.")
]
Lr = Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.")]
InitSeed = Annotated[
    int | None,
    typer.Option(
        "--init-seed",
        help="Seed of the adapters' initial factors only (default: --seed); vary it to "
        "measure how much of a result the initialisation explains.",
    ),
]

# defaults by task: classify / causal-lm as below, sft the shipped default's (job/sft.py)
TaskProbeSteps = Annotated[
    int | None, typer.Option("--probe-steps", help="Calibration batches to probe [64; sft 8].")
]
TaskEpochs = Annotated[
    int | None, typer.Option("--epochs", help="Passes over the training split [2; sft 1].")
]
TaskLr = Annotated[float | None, typer.Option("--lr", help="Peak AdamW learning rate [2e-3].")]
TaskBatchSize = Annotated[
    int | None, typer.Option("--batch-size", help="Examples per batch [32; sft 16].")
]
TaskMaxLength = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        help="Tokens per example [64: truncation; sft 96: prompt + answer + EOS, longer rows "
        "are refused].",
    ),
]
PromptCol = Annotated[
    str, typer.Option("--prompt-column", help="sft: column of prompts (text or chat turns).")
]
CompletionCol = Annotated[
    str, typer.Option("--completion-column", help="sft: column of completions (the answers).")
]
CategoryCol = Annotated[
    str | None,
    typer.Option(
        "--category-column",
        help="sft: column to break the scores down by [category, when the data has it].",
    ),
]
ChatTemplate = Annotated[
    str,
    typer.Option(
        "--chat-template",
        help="sft: auto (the tokenizer's chat template when it has one) or none (plain text).",
    ),
]
EvalSplit = Annotated[
    str,
    typer.Option(
        "--eval-split", help="sft, shipped math set: the split to score, test or validation."
    ),
]
EvalLimit = Annotated[
    int | None,
    typer.Option(
        "--eval-limit",
        help="sft: score this many held-out rows (a fixed subset) [shipped set 400; --data all].",
    ),
]

AdapterDtype = Annotated[
    str | None,
    typer.Option(
        "--adapter-dtype",
        help="dtype of the adapters: float32 (default, as peft, whatever the model's dtype: "
        "bf16 adapters round away small updates), bfloat16, float16 or float64.",
    ),
]


# -- train --------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n"
    "  entrolora train                                  # E²LoRA, embedded MiniLM + reviews\n\n"
    "  entrolora train --method ralora --r 8 --limit 2000 --output runs/ralora\n\n"
    "  entrolora train --model ./my-bert --data reviews.csv --text-column review "
    "--label-column stars --method e2lora -o threshold=0.85\n\n"
    "  entrolora train --model smollm2 --task causal-lm --method flexlora --max-steps 50\n\n"
    "  entrolora train --method auto --budget like-lora=8   # ranks bought across all layers"
    "  entrolora train --task sft --method lora     # SmolLM2 on the shipped math set"
)
@guarded
def train(
    model: ModelOpt = None,
    data: DataOpt = None,
    text_column: TextCol = "text",
    label_column: LabelCol = "label",
    merge_labels: MergeLabels = False,
    task: Task = "classify",
    method: MethodOpt = "e2lora",
    r: ROpt = 8,
    option: OptionOpt = None,
    budget: BudgetOpt = None,
    target_modules: TargetsOpt = None,
    probe_steps: TaskProbeSteps = None,
    probe_head: ProbeHead = "centroid",
    stats: StatsFile = None,
    keep_gradients: KeepGradients = False,
    plan: PlanFile = None,
    epochs: TaskEpochs = None,
    max_steps: MaxSteps = None,
    lr: TaskLr = None,
    batch_size: TaskBatchSize = None,
    max_length: TaskMaxLength = None,
    seed: Seed = 0,
    init_seed: InitSeed = None,
    adapter_dtype: AdapterDtype = None,
    limit: Limit = None,
    prompt_column: PromptCol = "prompt",
    completion_column: CompletionCol = "completion",
    category_column: CategoryCol = None,
    chat_template: ChatTemplate = "auto",
    eval_split: EvalSplit = "test",
    eval_limit: EvalLimit = None,
    device: Device = "auto",
    output: Annotated[str, typer.Option("--output", help="Run folder to write.")] = "runs/run",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Probe, plan, apply, train and evaluate; write metrics, adapter, peft export and report."""
    from ..data.sft import SFTOptions
    from ..job import TrainConfig, parse_options, train_run

    sized = {"probe_steps": probe_steps, "epochs": epochs, "max_steps": max_steps, "lr": lr,
             "batch_size": batch_size, "max_length": max_length}  # fmt: skip
    given = {k for k, v in sized.items() if v is not None}
    sft = SFTOptions(prompt_column=prompt_column, completion_column=completion_column,
                     category_column=category_column, chat_template=chat_template,
                     eval_split=eval_split, eval_limit=eval_limit)  # fmt: skip
    cfg = TrainConfig(
        model=model, data=data, text_column=text_column, label_column=label_column, task=task,
        merge_labels=merge_labels, method=method, r=r,
        options=with_budget(parse_options(option or []), budget, method),
        target_modules=target_list(target_modules), probe_head=probe_head, stats=stats,
        keep_gradients=keep_gradients, plan=plan, seed=seed, init_seed=init_seed, limit=limit,
        device=device, output=output, overwrite=overwrite, progress=not quiet,
        adapter_dtype=adapter_dtype, sft=sft,
        **{k: v for k, v in sized.items() if v is not None},
    )  # fmt: skip
    if task == "sft":  # the shipped default's sizes (job/sft.py) for what was not given
        from ..job.sft import with_sft_defaults

        cfg = with_sft_defaults(cfg, given | ({"eval_limit"} if eval_limit else set()))
    result = train_run(cfg)
    from ..distributed import is_main_process

    if not is_main_process():  # under torchrun / accelerate: rank 0 reports
        return
    con = console()
    con.print(metrics_table([result.metrics], f"entrolora train: {result.metrics['method']}"))
    if task == "sft":
        from ..job.sft import summary_lines

        for line in summary_lines(result.metrics):
            con.print(line, highlight=False)
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
    epochs: Epochs = 1,
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
    merge_labels: MergeLabels = False,
    batch_size: BatchSize = 32,
    max_length: MaxLength = 64,
    lr: Lr = 2e-3,
    seed: Seed = 0,
    device: Device = "auto",
    output: Annotated[str, typer.Option("--output", help="Demo folder.")] = "runs/demo",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """LoRA, E²LoRA, RaLoRA and FlexLoRA on the embedded default, same seed and budget.

    Every method is scored on the whole held-out split (about 2,570 snippets): --limit takes
    its training share (80 %) from the other films only.
    """
    from ..job import DEMO_METHODS, TrainConfig, demo_run

    if full and limit is not None:
        raise ValueError("--full and --limit contradict each other; pass one")
    base = TrainConfig(
        model=model, data=data, text_column=text_column, label_column=label_column, r=r,
        merge_labels=merge_labels, probe_steps=probe_steps, epochs=epochs,
        max_steps=max_steps, lr=lr,
        batch_size=batch_size, max_length=max_length, seed=seed, device=device,
        limit=None if full else (limit or DEMO_LIMIT), full_test=True, overwrite=overwrite,
        progress=not quiet,
    )  # fmt: skip
    results = demo_run(base, method or DEMO_METHODS, output)
    con = console()
    rows = [r_.metrics for r_ in results]
    first = rows[0]
    con.print(
        metrics_table(
            rows,
            f"entrolora demo: {first['train_examples']:,} train / {first['test_examples']:,} "
            f"held-out examples, r={r}, seed {seed}",
        )
    )
    con.print(f"report: {Path(output) / 'report.html'}")
