"""Training-step time of ``--task sft``: entrolora LoRA r=8 against peft LoRA r=8 on SmolLM2.

    python bench/speed/sft_step.py                 # SmolLM2-135M-Instruct, the shipped math set
    python bench/speed/sft_step.py --smoke         # a tiny random Llama on random tokens (CI)

Both models start from the same base weights (one load, two copies), adapters on q, k, v, o at
rank 8 (alpha 16), float32; they see the same batches: the job's length-grouped batches of the
math train split through SmolLM2's chat template (labels on the answers only). One step =
forward + backward + AdamW step + zero_grad. The two take turns over ``--rounds`` rounds of
``--warmup`` + ``--steps`` steps; figures are medians over all timed steps, the ratio is the
median of the per-round ratios (entrolora / peft). Also printed: how much padding the length
grouping saves against plain shuffled batches of the same size.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from pathlib import Path

import torch

import entrolora as el
from entrolora.data import sft as S

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _smollm2_tokens(batch: int) -> tuple[torch.nn.Module, S.SFTTokens, int]:
    from entrolora.job.models import load_model

    net, tok, _ = load_model("smollm2", "sft")
    rows = S.load_math("train")
    return net, S.tokenize(tok, rows, 96, "auto"), tok.pad_token_id


def _tiny_tokens(n: int = 256) -> tuple[torch.nn.Module, S.SFTTokens, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0)  # fmt: skip
    rng = random.Random(0)
    ps = [[rng.randrange(3, 96) for _ in range(rng.randint(8, 30))] for _ in range(n)]
    cs = [[rng.randrange(3, 96) for _ in range(rng.randint(1, 8))] + [2] for _ in range(n)]
    lengths = [len(p) + len(c) for p, c in zip(ps, cs)]
    return LlamaForCausalLM(cfg), S.SFTTokens(ps, cs, lengths=lengths), 0


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the batches' tokens that are padding."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / total


def _entrolora(base: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(base)
    return el.apply(model, el.plan_lora(model, r=8, target_modules=TARGETS))


def _peft(base: torch.nn.Module) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(base), config)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, random tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    steps = args.steps or (2 if args.smoke else 4)
    base, tokens, pad = _tiny_tokens() if args.smoke else _smollm2_tokens(args.batch_size)
    base.train()
    grouped = S.grouped_batches(tokens.lengths, args.batch_size, seed=0)
    plain = list(range(len(tokens)))
    random.Random(0).shuffle(plain)
    plain_b = [plain[j : j + args.batch_size] for j in range(0, len(plain), args.batch_size)]
    batches = [S.collate(tokens, b, pad) for b in grouped[: args.warmup + steps]]
    models = {"entrolora-lora-r8": _entrolora(base), "peft-lora-r8": _peft(base)}
    opts = {n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
            for n, m in models.items()}  # fmt: skip
    times: dict[str, list[float]] = {n: [] for n in models}
    ratios = []
    for _ in range(args.rounds):
        per_round = {}
        for name, model in models.items():

            def step(i: int, model=model, opt=opts[name]) -> None:
                model(**batches[i]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t = common.time_steps(step, steps, args.warmup).seconds
            times[name] += t
            per_round[name] = statistics.median(t)
        ratios.append(per_round["entrolora-lora-r8"] / per_round["peft-lora-r8"])
    dev = torch.device("cpu")
    print(f"# {'smoke: tiny Llama' if args.smoke else 'SmolLM2-135M-Instruct, math train split'}"
          f"; {common.describe(common.machine_info(dev))}")  # fmt: skip
    shape = [tuple(b["input_ids"].shape) for b in batches[args.warmup :]]
    print(f"# batches (rows × tokens): {shape}; padding: length-grouped "
          f"{100 * padding_share(tokens.lengths, grouped):.1f} %, shuffled "
          f"{100 * padding_share(tokens.lengths, plain_b):.1f} % of the tokens")  # fmt: skip
    rows = []
    for name, model in models.items():
        trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        ms = 1e3 * statistics.median(times[name])
        rows.append({"method": name, "trainable": f"{trainable:,}", "step ms": f"{ms:.0f}"})
    rows[0]["ratio"] = f"{statistics.median(ratios):.3f}"
    print(common.markdown_table(rows, ("method", "trainable", "step ms", "ratio")))
    return {"ratio": statistics.median(ratios), "times": times}


if __name__ == "__main__":
    main()
