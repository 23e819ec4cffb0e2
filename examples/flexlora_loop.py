"""FlexLoRA in a plain PyTorch loop: plan, apply, train with rank moves, save, plot, export.

    python examples/flexlora_loop.py                      # tiny random Llama, random tokens, CPU
    python examples/flexlora_loop.py --model PATH_OR_NAME --steps 2000

With ``--model`` any causal LM that ``AutoModelForCausalLM.from_pretrained`` loads works; the
data here are random tokens, so plug in your own batches for a real run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import entrolora as el
from entrolora.flex import plot_rank_evolution


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def main(argv: list[str] | None = None) -> el.FlexLoRA:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model name or path (default: tiny random)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default="flexlora_out")
    args = ap.parse_args(argv)

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        model = tiny_model()
    vocab = model.config.vocab_size

    # 1. Plan: r = 8 active directions per module, capacity 2r slots to grow into.
    plan = el.plan_flexlora(model, r=8, target_modules=["q_proj", "v_proj", "up_proj"])
    model = el.apply(model, plan)
    # 2. The controller: rank moves between t_warmup and T − t_final, every `interval` steps.
    flex = el.FlexLoRA(model, total_steps=args.steps, b0=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        ids = torch.randint(1, vocab, (4, 32), generator=g)
        loss = model(input_ids=ids, labels=ids).loss + flex.regularizer()
        loss.backward()
        pruned, expanded = flex.step(step, opt)  # after backward, before optimizer.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pruned:
            print(
                f"step {step}: moved {len(pruned)} direction(s), e.g. {pruned[0]} → {expanded[0]}"
            )

    # 3. Save (weights, masks, plan, controller state), plot the rank evolution, export to peft.
    out = Path(args.out)
    el.save(model, out / "adapter", flex=flex)
    plot_rank_evolution(flex.history, out / "rank_evolution.png")
    el.export_peft(model, out / "peft")
    print(f"total active rank {flex.total_rank} (constant); final ranks: {flex.ranks}")
    print(f"wrote {out}/adapter, {out}/rank_evolution.png, {out}/peft")
    return flex


if __name__ == "__main__":
    main()
