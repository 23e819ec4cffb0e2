"""Training-step time and peak memory of each entrolora adapter kind next to peft LoRA.

    python bench/speed/adapters.py                      # CUDA: --shape llama-1b, bf16, batch 8×512
    python bench/speed/adapters.py --shape smollm2      # SmolLM2-135M's shape on the CPU, fp32
    python bench/speed/adapters.py --smoke              # --shape toy, few steps, CPU (CI)

Shapes: bench/speed/shapes.py; adapters on q, k, v, o with rank 8, float32 on both sides
(entrolora's and peft's default); one step = forward + backward + AdamW step + zero_grad. Every kind
is measured on the same base model in the same run as its peft peer (LoRA r=8; DoRA against peft
DoRA): the methods take turns over ``--rounds`` rounds (each round: apply, warm-up steps, timed
steps, remove), figures are medians over all timed steps and each ratio is the median of the
per-round ratios to the peer. Block-diagonal rows: uniform block counts, and ``ralora-plan``
with each module's block count from a RaLoRA plan of the same shape (``--blocks-from
plan.json``, e.g. from a probe of the real SmolLM2). Issue targets: shared adapters ≤ 1.03×
peft LoRA time and ≤ its memory; block-diagonal with the planner's counts ≤ 1.10×.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import entrolora as el
from entrolora.adapters.inject import num_trainable_params, remove_adapters
from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from shapes import SHAPES, add_shape_option, default_shape, llama_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 8
INTERVAL = 4  # layers per sharing interval in the E²LoRA-like plans
RUNS = {"toy": (3, 1, 2), "smollm2": (6, 1, 3), "llama-1b": (20, 5, 3)}  # steps, warm-up, rounds
BLOCKS = {"toy": (4, 8), "smollm2": (4, 8, 16), "llama-1b": (4, 8, 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    name: str
    peer: str
    trainable: int
    step_ms: float
    peak_mib: float | None
    time_ratio: float | None = None
    memory_ratio: float | None = None
    round_ratios: list[float] = field(default_factory=list)
    step_cpu_ms: float | None = None
    cpu_ratio: float | None = None


def _plan(targets, kind="lora", blocks=1, share=None) -> AdaptationPlan:
    """Rank-8 plans built by hand: ``share`` is None, "intervals" or "sharelora"; ``blocks`` an
    int or ``{module: count}``."""
    mods, groups = {}, {}
    for n, t in targets.items():
        shared, group = {}, None
        if share is not None:
            group = f"{t.module_type}:{t.layer // INTERVAL}"
            shared = {"A": group, "B": group}
            if share == "sharelora":
                shared["A"] = f"{t.module_type}:type"
        n_blocks = blocks.get(n, 1) if isinstance(blocks, dict) else blocks
        mods[n] = ModulePlan(RANK, t.d_in, t.d_out, t.module_type, t.layer, kind=kind,
                             group=group, blocks=n_blocks, shared=shared)  # fmt: skip
        for factor, gid in shared.items():
            g = groups.get(gid)
            members = (*g.members, n) if g else (n,)
            factors = tuple(sorted({*(g.factors if g else ()), factor}))
            groups[gid] = GroupPlan(members, factors, RANK, t.module_type)
    return AdaptationPlan(f"bench-{kind}", mods, groups, lora_alpha=2 * RANK)


def planner_blocks(path: str | os.PathLike, targets) -> dict[str, int]:
    """``{module: block count}`` of a saved plan (RaLoRA's), for the modules benchmarked here."""
    plan = AdaptationPlan.load(path)
    missing = sorted(set(targets) - set(plan.modules))
    if missing:
        raise ValueError(
            f"--blocks-from plan has no module {missing[0]!r}; pass a plan for this shape's "
            "q, k, v, o projections"
        )
    return {n: plan.modules[n].blocks for n in targets}


class Method:
    """One benchmarked configuration: set up on the shared base model, stepped, torn down."""

    def __init__(self, name: str, peer: str, plan: AdaptationPlan | None = None, dora=False):
        self.name, self.peer, self.plan, self.dora = name, peer, plan, dora
        self.times: list[float] = []  # seconds of every timed step
        self.cpu: list[float] = []  # CPU seconds of this process in every timed step
        self.rounds: list[float] = []  # median step seconds of each round
        self.cpu_rounds: list[float] = []  # median step CPU seconds of each round
        self.trainable = 0
        self.peak: float | None = None

    def setup(self, model):
        if self.plan is None:  # peft peer
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                lora_dropout=0.0, use_dora=self.dora)  # fmt: skip
            wrapped = get_peft_model(model, config)  # adapters float32 (autocast_adapter_dtype)
            params = [p for p in wrapped.parameters() if p.requires_grad]
            self.trainable = sum(p.numel() for p in params)
            return wrapped, params, wrapped.unload
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        el.apply(model, self.plan)  # adapters float32 by default
        self.trainable = num_trainable_params(model)
        return model, list(el.trainable_parameters(model)), lambda: remove_adapters(model, flags)


def run_round(method: Method, model, batch, steps: int, warmup: int, cuda: bool) -> None:
    """Apply ``method``, step ``warmup + steps`` times (timing the last ``steps``), remove it."""
    stepped, params, teardown = method.setup(model)
    try:
        opt = torch.optim.AdamW(params, lr=1e-4)
        times, cpu = [], []
        for i in range(warmup + steps):
            if cuda:
                if i == warmup:
                    torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            stepped(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
            method.peak = peak if method.peak is None else max(method.peak, peak)
        method.times += times
        method.cpu += cpu
        method.rounds.append(statistics.median(times))
        method.cpu_rounds.append(statistics.median(cpu))
        del opt
    finally:
        teardown()


def methods_for(shape: str, targets, blocks_from: str | None) -> list[Method]:
    """The peers first, then every entrolora kind with its peer."""
    out = [Method("peft-lora-r8", "peft-lora-r8")]
    if shape != "smollm2":  # DoRA is not among the targets: spared on the slow CPU run
        out.append(Method("peft-dora-r8", "peft-dora-r8", dora=True))
    out += [
        Method("lora-r8", "peft-lora-r8", _plan(targets)),
        Method("e2lora-intervals", "peft-lora-r8", _plan(targets, share="intervals")),
        Method("e2sharelora", "peft-lora-r8", _plan(targets, share="sharelora")),
    ]
    out += [
        Method(f"blockdiag-n{n}", "peft-lora-r8", _plan(targets, blocks=n)) for n in BLOCKS[shape]
    ]
    if blocks_from:
        counts = planner_blocks(blocks_from, targets)
        out.append(Method("ralora-plan", "peft-lora-r8", _plan(targets, blocks=counts)))
    if shape != "smollm2":
        out.append(Method("dora-r8", "peft-dora-r8", _plan(targets, kind="dora")))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="--shape toy, few steps, CPU")
    add_shape_option(ap)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--steps", type=int, help="timed steps per round (shape's default)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps per round")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (shape's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--blocks-from", default=None, help="a RaLoRA plan.json of this shape")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.shape = "toy" if args.smoke else args.shape or default_shape(False, cuda)
    if SHAPES[args.shape]["device"] == "cuda" and not cuda:
        ap.error(f"--shape {args.shape} is measured on CUDA; use --shape smollm2 on the CPU")
    steps, warmup, rounds = RUNS[args.shape]
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.rounds = args.rounds or rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    from transformers import LlamaForCausalLM

    args = parse(argv)
    shape = SHAPES[args.shape]
    device, cuda = shape["device"], shape["device"] == "cuda"
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args.shape)).to(
        device=device, dtype=DTYPES[shape["dtype"]]
    )
    for p in model.parameters():
        p.requires_grad_(False)
    targets = el.find_targets(model, TARGETS)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g)
    batch = batch.to(device)
    methods = methods_for(args.shape, targets, args.blocks_from)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    head = (
        f"shape {args.shape}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"batch {shape['batch']}x{shape['seq']}, {shape['dtype']} on {device}, adapters float32, "
        f"r={RANK} on {','.join(TARGETS)}; {args.rounds} interleaved round(s) of {args.warmup} "
        f"warm-up + {args.steps} timed steps; {torch.get_num_threads()} torch thread(s); "
        f"load average {load}"
    )
    print(head)
    for r in range(args.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate the start
        for m in order:
            run_round(m, model, batch, args.steps, args.warmup, cuda)
    rows = report(methods)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return rows


def report(methods: list[Method]) -> list[Row]:
    """Rows with medians and per-round ratios to each method's peer; printed as a table."""
    by = {m.name: m for m in methods}
    rows = []
    for m in methods:
        peer = by[m.peer]
        ratios = [a / b for a, b in zip(m.rounds, peer.rounds)]
        cpu_ratios = [a / b for a, b in zip(m.cpu_rounds, peer.cpu_rounds)]
        is_peer = m.name == m.peer
        mem = m.peak / peer.peak if m.peak and peer.peak and not is_peer else None
        rows.append(Row(m.name, m.peer, m.trainable, 1e3 * statistics.median(m.times), m.peak,
                        None if is_peer else statistics.median(ratios), mem,
                        [] if is_peer else ratios, 1e3 * statistics.median(m.cpu),
                        None if is_peer else statistics.median(cpu_ratios)))  # fmt: skip
    print(f"{'adapter':<18} {'vs':<13} {'trainable':>11} {'step ms':>9} {'peak MiB':>9} "
          f"{'time×':>6} {'rounds×':>13} {'CPU ms':>9} {'CPU×':>6} {'mem×':>6}")  # fmt: skip
    for r in rows:
        peak = f"{r.peak_mib:9.0f}" if r.peak_mib is not None else f"{'n/a':>9}"
        tr = f"{r.time_ratio:6.3f}" if r.time_ratio is not None else f"{'-':>6}"
        rr = f"{min(r.round_ratios):.3f}-{max(r.round_ratios):.3f}" if r.round_ratios else "-"
        mr = f"{r.memory_ratio:6.3f}" if r.memory_ratio is not None else f"{'-':>6}"
        cr = f"{r.cpu_ratio:6.3f}" if r.cpu_ratio is not None else f"{'-':>6}"
        print(f"{r.name:<18} {r.peer:<13} {r.trainable:>11,} {r.step_ms:9.2f} {peak} {tr} "
              f"{rr:>13} {r.step_cpu_ms:9.2f} {cr} {mr}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
