"""Training-step time and peak memory of each entrolora adapter kind next to peft LoRA.

Llama-1.1B shape (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 kv heads), bf16,
batch 8×512, adapters on q, k, v, o; one step = forward + backward + AdamW step. Each entrolora
kind is measured on the same base model in the same run as its peft peer (LoRA r=8; DoRA also
against peft DoRA), and the ratio to the peer is printed. Issue targets (GPU only): shared
adapters ≤ 1.03× peft LoRA time and ≤ its memory; block-diagonal (n ≤ 32, r = 8) ≤ 1.10×.

    python bench/adapters.py            # CUDA, the full shape
    python bench/adapters.py --smoke    # tiny model, few steps, CPU: only checks it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import entrolora as el
from entrolora.inject import remove_adapters
from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FULL = dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
            batch=8, seq=512, steps=20, warmup=5)  # fmt: skip
SMOKE = dict(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128,
             batch=2, seq=16, steps=3, warmup=1)  # fmt: skip
RANK = 8
INTERVAL = 4  # layers per sharing interval in the E²LoRA-like plans


@dataclass
class Row:
    name: str
    peer: str
    trainable: int
    step_ms: float
    peak_mib: float | None
    time_ratio: float | None = None
    memory_ratio: float | None = None


def _plan(targets, kind="lora", blocks=1, share=None) -> AdaptationPlan:
    """Rank-8 plans built by hand: ``share`` is None, "intervals" or "sharelora"."""
    mods, groups = {}, {}
    for n, t in targets.items():
        shared, group = {}, None
        if share is not None:
            group = f"{t.module_type}:{t.layer // INTERVAL}"
            shared = {"A": group, "B": group}
            if share == "sharelora":
                shared["A"] = f"{t.module_type}:type"
        mods[n] = ModulePlan(RANK, t.d_in, t.d_out, t.module_type, t.layer, kind=kind,
                             group=group, blocks=blocks, shared=shared)  # fmt: skip
        for factor, gid in shared.items():
            g = groups.get(gid)
            members = (*g.members, n) if g else (n,)
            factors = tuple(sorted({*(g.factors if g else ()), factor}))
            groups[gid] = GroupPlan(members, factors, RANK, t.module_type)
    return AdaptationPlan(f"bench-{kind}", mods, groups, lora_alpha=2 * RANK)


def _model(cfg: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=max(cfg["seq"], 64),
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def _measure(model, params, batch, cfg, device) -> tuple[float, float | None]:
    """Median step time (ms) over ``steps`` steps after ``warmup``, and peak memory (MiB)."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = device == "cuda"
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        if i == cfg["warmup"] and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    del opt
    return 1e3 * statistics.median(times), peak


def _entrolora(model, plan, batch, cfg, device):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    el.apply(model, plan)
    try:
        count = el.inject.num_trainable_params(model)
        ms, peak = _measure(model, list(el.trainable_parameters(model)), batch, cfg, device)
    finally:
        remove_adapters(model, flags)
    return count, ms, peak


def _peft(model, targets, batch, cfg, device, use_dora=False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(targets),
                        lora_dropout=0.0, use_dora=use_dora)  # fmt: skip
    pm = get_peft_model(model, config, autocast_adapter_dtype=False)
    try:
        params = [p for p in pm.parameters() if p.requires_grad]
        ms, peak = _measure(pm, params, batch, cfg, device)
        count = sum(p.numel() for p in params)
    finally:
        pm.unload()
    return count, ms, peak


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--steps", type=int, help="timed steps (default: 20 on GPU, 3 smoke)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps before them")
    args = ap.parse_args(argv)
    full = not args.smoke and torch.cuda.is_available()
    cfg = FULL if full else SMOKE
    if args.steps is not None or args.warmup is not None:
        cfg = {**cfg, "steps": args.steps or cfg["steps"], "warmup": args.warmup or cfg["warmup"]}
    device = "cuda" if full else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _model(cfg, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = el.find_targets(model, TARGETS)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(device)
    print(f"device {device}  dtype {dtype}  config {cfg}")

    peers = {"peft-lora-r8": _peft(model, targets, batch, cfg, device)}
    peers["peft-dora-r8"] = _peft(model, targets, batch, cfg, device, use_dora=True)
    rows = [Row(n, n, c, ms, pk) for n, (c, ms, pk) in peers.items()]
    kinds = {
        "lora-r8": (_plan(targets), "peft-lora-r8"),
        "e2lora-intervals": (_plan(targets, share="intervals"), "peft-lora-r8"),
        "e2sharelora": (_plan(targets, share="sharelora"), "peft-lora-r8"),
        "blockdiag-n4": (_plan(targets, blocks=4), "peft-lora-r8"),
        "blockdiag-n8": (_plan(targets, blocks=8), "peft-lora-r8"),
        "blockdiag-n32": (_plan(targets, blocks=32), "peft-lora-r8"),
        "dora-r8": (_plan(targets, kind="dora"), "peft-dora-r8"),
    }
    if not full:  # the smoke model is too narrow for 32 blocks
        kinds.pop("blockdiag-n32")
    for name, (plan, peer) in kinds.items():
        count, ms, peak = _entrolora(model, plan, batch, cfg, device)
        _, peer_ms, peer_peak = peers[peer]
        mem_ratio = peak / peer_peak if peak and peer_peak else None
        rows.append(Row(name, peer, count, ms, peak, ms / peer_ms, mem_ratio))

    print(f"{'adapter':<18} {'vs':<13} {'trainable':>11} {'step ms':>9} {'peak MiB':>9} "
          f"{'time×':>6} {'mem×':>6}")  # fmt: skip
    for r in rows:
        peak = f"{r.peak_mib:9.0f}" if r.peak_mib is not None else f"{'n/a':>9}"
        tr = f"{r.time_ratio:6.3f}" if r.time_ratio is not None else f"{'-':>6}"
        mr = f"{r.memory_ratio:6.3f}" if r.memory_ratio is not None else f"{'-':>6}"
        print(f"{r.name:<18} {r.peer:<13} {r.trainable:>11,} {r.step_ms:9.2f} {peak} {tr} {mr}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
