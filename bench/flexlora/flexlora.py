"""Step time and peak memory of FlexLoRA next to peft LoRA and peft AdaLoRA, in the same run.

    python bench/flexlora/flexlora.py                    # CUDA: --shape llama-1b, bf16, batch 8×512
    python bench/flexlora/flexlora.py --shape smollm2       # SmolLM2-135M's shape, fp32, on the CPU
    python bench/flexlora/flexlora.py --smoke               # --shape toy, a few steps (CI)

Every method trains a fresh random Llama of the same shape with the job's AdamW (fused where torch
has the kernel: ``entrolora.job.loop.adamw``) on the same random tokens:
peft LoRA r=8, peft AdaLoRA (init_r 12 → target_r 8, its own orthogonality term and budget
schedule), FlexLoRA (r=8, capacity 2r, regulariser in the loss, rank moves every ``--interval``
steps). Adapters are float32 on both sides when the model is. A step is forward + backward +
controller + ``optimizer.step()`` + ``zero_grad``. The methods' steps are interleaved (round
robin, the order rotating every round) so that a busy machine slows all of them alike; figures
are medians (and means, which include the adjustment steps) over the timed steps after warm-up,
and ratios are against peft LoRA measured in the same run. Targets: FlexLoRA ≤ 1.10× peft LoRA
per step (issue 5) and below peft AdaLoRA (issue 16).

Shapes: ``toy`` (2 layers, hidden 64: the smoke test), ``smollm2`` (random weights at
SmolLM2-135M's shape: 30 layers, hidden 576, 9 heads / 3 kv heads, intermediate 1536, fp32,
batch 2×64 on the CPU) and ``llama-1b`` (TinyLlama-1.1B's shape, bf16, batch 8×512 on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from entrolora.job.loop import adamw

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SHAPES = {  # LlamaConfig fields; batch × seq; timed / warm-up steps; adjustment interval
    "toy": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, batch=(2, 16), steps=(20, 3, 2)),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    batch=(2, 64), steps=(20, 3, 5)),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     batch=(8, 512), steps=(30, 5, 10)),
}  # fmt: skip


@dataclass
class Result:
    method: str
    trainable: int
    median_ms: float
    mean_ms: float
    peak_mib: float | None
    adapter_dtype: str
    median_cpu_ms: float | None = None  # CPU time of this process: steadier on a shared CPU


def llama_config(shape: str):
    from transformers import LlamaConfig

    fields = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "steps")}
    return LlamaConfig(max_position_embeddings=2048, **fields)


def base_model(cfg, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


def setup_lora(model, targets, total, args):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, cfg), (None, None, None)


def setup_adalora(model, targets, total, args):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(
        init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
        tinit=args.warmup, tfinal=1, deltaT=args.interval, total_step=total,
    )  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    # After optimizer.step(), before zero_grad (peft's documented order): it reads the gradients.
    return peft_model, (None, None, lambda t, opt: peft_model.base_model.update_and_allocate(t))


def setup_flexlora(model, targets, total, args):
    import entrolora as el

    plan = el.plan_flexlora(model, r=8, capacity=16, target_modules=targets)
    model = el.apply(model, plan)
    flex = el.FlexLoRA(
        model, total_steps=total, b0=4, t_warmup=args.warmup, t_final=0, interval=args.interval
    )
    return model, (flex.regularizer, lambda t, opt: flex.step(t, opt), None)


METHODS = {
    "peft LoRA r=8": setup_lora,
    "peft AdaLoRA 12→8": setup_adalora,
    "FlexLoRA r=8 c=16": setup_flexlora,
}


class Runner:
    """One method's model, optimizer and hooks; ``step(t)`` is one timed training step."""

    def __init__(self, name, setup, args, cfg, device, dtype, batch):
        total = args.warmup + args.steps
        self.name, self.device, self.batch, self.times, self.cpu = name, device, batch, [], []
        self.model, (self.extra, self.before, self.after) = setup(
            base_model(cfg, device, dtype), args.targets.split(","), total, args
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = adamw(self.params, lr=1e-4)  # the job's optimizer (fused where torch can)

    def step(self, t: int) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start, cpu = time.perf_counter(), time.process_time()
        loss = self.model(**self.batch).loss
        if self.extra is not None:
            loss = loss + self.extra()
        loss.backward()
        if self.before is not None:
            self.before(t, self.opt)
        self.opt.step()
        if self.after is not None:
            self.after(t, self.opt)
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.last_cpu = time.process_time() - cpu
        return time.perf_counter() - start

    def result(self, peak: float | None) -> Result:
        return Result(
            self.name, sum(p.numel() for p in self.params),
            1e3 * statistics.median(self.times), 1e3 * statistics.fmean(self.times), peak,
            str(self.params[0].dtype).removeprefix("torch."),
            1e3 * statistics.median(self.cpu) if self.cpu else None,
        )  # fmt: skip


def run_interleaved(args, cfg, device, dtype, batch) -> list[Result]:
    """All methods side by side (CPU): one step of each per round, the order rotating."""
    runners = [Runner(n, s, args, cfg, device, dtype, batch) for n, s in METHODS.items()]
    for t in range(args.warmup + args.steps):
        k = t % len(runners)
        for r in runners[k:] + runners[:k]:
            dt = r.step(t)
            if t >= args.warmup:
                r.times.append(dt)
                r.cpu.append(r.last_cpu)
    return [r.result(None) for r in runners]


def run_one(name, setup, args, cfg, device, dtype, batch) -> Result:
    """One method alone (CUDA: its own peak memory)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    r = Runner(name, setup, args, cfg, device, dtype, batch)
    for t in range(args.warmup + args.steps):
        dt = r.step(t)
        if t >= args.warmup:
            r.times.append(dt)
    res = r.result(torch.cuda.max_memory_allocated(device) / 2**20)
    del r
    gc.collect()
    return res


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default=None,
                    help="model shape (default: llama-1b on CUDA, else toy)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="--shape toy, 3 timed steps, CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (shape's default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (shape's default)")
    ap.add_argument("--interval", type=int, default=None, help="rank-move period")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--targets", default=TARGETS, help="comma-separated target modules")
    ap.add_argument("--save", default=None, help="also write the output to this text file")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    cuda = torch.cuda.is_available() and not args.smoke and args.shape != "smollm2"
    args.shape = "toy" if args.smoke else args.shape or ("llama-1b" if cuda else "toy")
    args.device = torch.device("cuda" if cuda and args.shape == "llama-1b" else "cpu")
    steps, warmup, interval = SHAPES[args.shape]["steps"]
    batch, seq = SHAPES[args.shape]["batch"]
    args.steps = args.steps or (3 if args.smoke else steps)
    args.warmup = args.warmup or (1 if args.smoke else warmup)
    args.interval = args.interval or (2 if args.smoke else interval)
    args.batch, args.seq = args.batch or batch, args.seq or seq
    return args


def table(results: list[Result]) -> list[str]:
    """The printed table: figures and ratios to peft LoRA (the first method)."""
    ref = results[0]
    lines = [
        f"{'method':<20} {'trainable':>11} {'median ms':>10} {'mean ms':>9} {'× LoRA':>7} "
        f"{'peak MiB':>9} {'× LoRA':>7} {'adapter':>8} {'CPU ms':>9} {'CPU×':>6}"
    ]
    for r in results:
        mem = (
            f"{r.peak_mib:9.0f} {r.peak_mib / ref.peak_mib:7.3f}"
            if r.peak_mib
            else f"{'n/a':>9} {'':>7}"
        )
        cpu = (
            f" {r.median_cpu_ms:9.2f} {r.median_cpu_ms / ref.median_cpu_ms:6.3f}"
            if r.median_cpu_ms and ref.median_cpu_ms
            else ""
        )
        lines.append(
            f"{r.method:<20} {r.trainable:>11,} {r.median_ms:10.2f} {r.mean_ms:9.2f} "
            f"{r.median_ms / ref.median_ms:7.3f} {mem} {r.adapter_dtype:>8}{cpu}"
        )
    return lines


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config(args.shape)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    head = (
        f"{args.shape} Llama shape{' (smoke)' if args.smoke else ''} on {where}, {dtype}, batch "
        f"{args.batch}×{args.seq}, targets {args.targets}; {args.warmup} warm-up + "
        f"{args.steps} timed steps; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(head, flush=True)
    if device.type == "cuda":
        results = [run_one(n, s, args, cfg, device, dtype, batch) for n, s in METHODS.items()]
    else:
        results = run_interleaved(args, cfg, device, dtype, batch)
    lines = table(results)
    print("\n".join(lines))
    if args.save:
        end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        text = [f"# python bench/flexlora/flexlora.py {' '.join(args.argv)}", head, *lines,
                f"(load average at the end: {end:.2f})"]  # fmt: skip
        with open(args.save, "w", encoding="utf-8") as f:
            f.write("\n".join(text) + "\n")
    return results


if __name__ == "__main__":
    main()
