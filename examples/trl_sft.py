"""Train an ``el.apply``-ed model with TRL's ``SFTTrainer`` on the shipped math set.

    pip install trl            # trl 1.16 (pulls in datasets)
    python examples/trl_sft.py --max-steps 20 --output runs/trl-sft

entrolora decides where the capacity goes (here E²LoRA's plan from a short probe; ``--method
lora`` skips the probe) and builds the adapters; TRL does the rest: the chat template, the loss on
the completion only (``completion_only_loss``, TRL's default for prompt/completion rows), EOS,
batching. The adapter is saved with ``el.save`` (and by ``EntroloraCallback`` at save steps),
so ``entrolora export`` / ``el.export_peft`` turn it into a stock peft checkpoint as usual.
"""

from __future__ import annotations

import argparse
from typing import Any

import entrolora as el
from entrolora.data import sft as S


def conversational(ds: S.SFTDataset) -> list[dict[str, Any]]:
    """TRL's conversational prompt/completion rows (so TRL applies the chat template)."""
    return [
        {"prompt": p if isinstance(p, list) else [{"role": "user", "content": p}],
         "completion": [{"role": "assistant", "content": c}]}
        for p, c in zip(ds.prompts, ds.completions)
    ]  # fmt: skip


def adapt(model: Any, tokenizer: Any, ds: S.SFTDataset, method: str, r: int) -> Any:
    """``el.apply`` the method's plan (probing a few batches of the job's SFT loss first)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if method in ("lora", "sharelora", "flexlora"):
        return el.apply(model, el.plan(method, model, r=r, target_modules=targets))
    toks = S.tokenize(tokenizer, ds, 96, "auto")
    batches = [S.collate(toks, b, tokenizer.pad_token_id)
               for b in S.grouped_batches(toks.lengths, 8, seed=0)[:4]]  # fmt: skip
    stats = el.probe(model, batches, targets, steps=len(batches))
    return el.apply(model, el.plan(method, stats, r=r), stats=stats)


def build_trainer(model: Any, tokenizer: Any, ds: S.SFTDataset, output: str, **args: Any):
    """An ``SFTTrainer`` over ``ds`` for an already adapted ``model`` (``args``: SFTConfig's)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from entrolora.integrations.transformers import EntroloraCallback

    config = SFTConfig(output_dir=output, report_to=[], save_strategy="no", **args)
    return SFTTrainer(model=model, args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(conversational(ds)),
                      callbacks=[EntroloraCallback()])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local causal-LM folder")
    p.add_argument("--method", default="e2lora")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--output", default="runs/trl-sft")
    args = p.parse_args(argv)
    from entrolora.job.models import load_model

    model, tokenizer, _ = load_model(args.model, "sft")
    train = S.load_math("train")
    model = adapt(model, tokenizer, train, args.method, args.r)
    trainer = build_trainer(model, tokenizer, train, args.output, max_steps=args.max_steps,
                            per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                            max_length=96, use_cpu=True, logging_steps=5)  # fmt: skip
    trainer.train()
    el.save(model, f"{args.output}/adapter")
    print(f"adapter written to {args.output}/adapter (entrolora export turns it into peft)")


if __name__ == "__main__":
    main()
