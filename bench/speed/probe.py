"""Wall time and peak memory of entrolora.probe next to plain forward+backward steps, same run.

    python bench/speed/probe.py                # CUDA: --shape llama-1b, bf16, batch 8×512, 64 steps
    python bench/speed/probe.py --shape smollm2  # SmolLM2-135M's shape on the CPU, fp32, batch 2×64
    python bench/speed/probe.py --smoke             # --shape toy on the CPU, 8 steps (CI)

Shapes: bench/speed/shapes.py. The peer is S plain steps of the same random model on the same random
tokens: only the target weights require grad, forward + ``loss.backward()``, then the gradients
are dropped; warm-up steps are excluded. The probe's time is the whole ``el.probe`` call,
statistics included (raw and signal: the probe keeps even/odd half-sums), with offload=None and
offload="cpu". The three phases are interleaved over ``--repeats`` rounds and each figure is
the median over the rounds. Then the statistics alone (``GradientStats.from_halves`` on
accumulator-like gradients, on the model's device) and the effective ranks alone (raw and
signal), and the ratio at the default S = 64 derived from the run (the statistics are a fixed
cost per probe: a short run overstates the ratio). Targets (issues 2, 16): probe ≤ 1.25× the
plain steps; peak GPU memory with offload="cpu" ≤ the plain steps' peak. On the CPU,
per-phase peak memory is not measurable in-process: the script prints "n/a" and the process's
max RSS for the whole run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from shapes import SHAPES, add_shape_option, default_shape  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Config:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    steps: int
    dtype: str
    warmup: int
    repeats: int


# probe steps S, warm-up steps, interleaved rounds per shape
RUNS = {"toy": (8, 1, 3), "smollm2": (16, 2, 3), "llama-1b": (64, 3, 1)}
DEFAULT_S = 64  # entrolora.probe's default steps


def shape_config(shape: str) -> Config:
    s = SHAPES[shape]
    steps, warmup, repeats = RUNS[shape]
    return Config(
        s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"],
        s["num_attention_heads"], s["num_key_value_heads"], s["vocab_size"], s["batch"],
        s["seq"], steps, s["dtype"], warmup, repeats,
    )  # fmt: skip


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="--shape toy on the CPU (CI)")
    add_shape_option(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: the shape's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    for field in Config.__dataclass_fields__:
        p.add_argument(f"--{field.replace('_', '-')}", default=None, type=str)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.shape = "toy" if args.smoke else args.shape or default_shape(False, cuda)
    device = args.device or ("cuda" if SHAPES[args.shape]["device"] == "cuda" else "cpu")
    if device.startswith("cuda") and not cuda:
        p.error(f"--shape {args.shape} is measured on CUDA; use --shape smollm2 on the CPU")
    base = shape_config(args.shape)
    values = {}
    for field, kind in ((f, type(getattr(base, f))) for f in Config.__dataclass_fields__):
        given = getattr(args, field)
        values[field] = kind(given) if given is not None else getattr(base, field)
    if values["dtype"] not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    args.device = device
    if args.threads:
        torch.set_num_threads(args.threads)
    return Config(**values), args


def build(cfg: Config, device: str, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(2048, cfg.seq),
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=DTYPES[cfg.dtype]).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(cfg.steps + cfg.warmup):
        ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measured(device: str, fn: Callable[[], object]) -> tuple[float, float, float | None, object]:
    """``(wall s, CPU s of this process, peak GPU MiB or None, result)`` of ``fn()``.

    On a shared CPU the process's CPU time is the steadier measure of the work done."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return seconds, cpu, peak, out


def extrapolate(
    steps: int, to: int, plain: tuple[float, float], probe: tuple[float, float], stats_cpu: float
) -> tuple[float, float]:
    """``(wall, CPU)`` ratio of a ``to``-step probe to ``to`` plain steps from an ``steps``-step
    run: the probe's step part (probe − statistics) and the plain steps scale by ``to/steps``,
    the statistics stay (their wall time taken as the probe's wall/CPU proportion)."""
    out = []
    for p, q in zip(plain, probe):
        stats = stats_cpu * (q / probe[1])  # the statistics' share, in this column's unit
        out.append(((q - stats) * to / steps + stats) / (p * to / steps))
    return out[0], out[1]


def plain_steps(model, batches, targets) -> None:
    """Forward + backward with only the target weights requiring grad; gradients dropped."""
    for b in batches:
        model(**b).loss.backward()
        for w in targets:
            w.grad = None


def main(argv: list[str] | None = None) -> dict:
    import entrolora as el
    from entrolora.stats import GradientStats
    from entrolora.stats.spectral import effective_ranks

    cfg, args = parse(argv)
    device = args.device
    targets = args.targets.split(",")
    model, batches = build(cfg, device, SHAPES[args.shape].get("tie_word_embeddings", False))
    warm, timed = batches[: cfg.warmup], batches[cfg.warmup :]
    names = list(el.find_targets(model, targets))
    weights = [model.get_submodule(n).weight for n in names]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"shape {args.shape}: Llama {cfg.layers} layers, hidden {cfg.hidden}, "
        f"intermediate {cfg.intermediate}, "
        f"{cfg.heads} heads / {cfg.kv_heads} kv, vocab {cfg.vocab} ({n_params / 1e6:.1f}M params), "
        f"{cfg.dtype}, batch {cfg.batch}x{cfg.seq}, {cfg.steps} steps, {len(names)} targets "
        f"({args.targets}), device {device}"
        + (f" [{torch.cuda.get_device_name()}]" if device.startswith("cuda") else "")
    )

    def run_plain():
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        try:
            plain_steps(model, timed, weights)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)

    def run_probe(offload):
        return el.probe(model, timed, targets, steps=cfg.steps, offload=offload, progress=False)

    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    plain_steps(model, warm, weights)  # warm-up: kernels, allocator, cuBLAS handles
    for p in model.parameters():
        p.requires_grad_(True)
    # Phases interleaved, median of `repeats` each: a busy machine slows all of them alike.
    runs: dict[str, list[tuple]] = {"plain": [], "probe": [], "offload": []}
    stats = None
    for _ in range(cfg.repeats):
        for key, fn in (
            ("plain", run_plain),
            ("probe", lambda: run_probe(None)),
            ("offload", lambda: run_probe("cpu")),
        ):
            seconds, cpu, peak, out = measured(device, fn)
            if key == "probe":
                stats = out
            runs[key].append((seconds, cpu, peak))

    def med(key: str) -> tuple[float, float, float | None]:
        peaks = [pk for *_, pk in runs[key] if pk is not None]
        wall = statistics.median(t for t, _, _ in runs[key])
        return wall, statistics.median(c for _, c, _ in runs[key]), (max(peaks) if peaks else None)

    (
        (plain_s, plain_cpu, plain_peak),
        (probe_s, probe_cpu, probe_peak),
        (off_s, off_cpu, off_peak),
    ) = map(med, ("plain", "probe", "offload"))

    # The statistics alone, from accumulator-like half means on the model's device: G₁, G₂
    # around the probe's G with a seeded difference (the cost does not depend on the values).
    gen = torch.Generator().manual_seed(2)
    grads = {n: g.to(device) for n, g in stats.gradients.items()}
    spread = {
        n: (torch.randn(g.shape, generator=gen) * g.std()).to(device) for n, g in grads.items()
    }
    first = {n: g + spread[n] for n, g in grads.items()}
    second = {n: g - spread[n] for n, g in grads.items()}
    noises = [spread[n] for n in grads]
    w_by_name = {n: model.get_submodule(n).weight.detach() for n in names}
    stats_s, stats_cpu, *_ = measured(
        device,
        lambda: GradientStats.from_halves(first, second, w_by_name, keep_gradients=False),
    )
    erank_s, *_ = measured(device, lambda: effective_ranks(list(grads.values())))
    signal_s, *_ = measured(device, lambda: effective_ranks(list(grads.values()), noises))

    def mib(x: float | None) -> str:
        return "n/a (CPU)" if x is None else f"{x:,.0f} MiB"

    rows = [
        ("plain fwd+bwd x S", plain_s, plain_cpu, plain_peak),
        ("probe offload=None", probe_s, probe_cpu, probe_peak),
        ('probe offload="cpu"', off_s, off_cpu, off_peak),
    ]
    print(
        f"median of {cfg.repeats} interleaved repeat(s); {cfg.warmup} warm-up step(s) excluded; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    print(
        f"{'':24} {'wall s':>9} {'ms/step':>9} {'vs plain':>9} {'CPU s':>9} {'vs plain':>9} "
        f"{'peak GPU mem':>16}"
    )
    for label, s, c, peak in rows:
        print(
            f"{label:24} {s:9.3f} {1e3 * s / cfg.steps:9.1f} {s / plain_s:8.3f}x {c:9.3f} "
            f"{c / plain_cpu:8.3f}x {mib(peak):>16}"
        )
    print(
        f"statistics alone (from_halves, raw + signal, {len(grads)} modules): {stats_s:.3f} s, "
        f"CPU {stats_cpu:.3f} s"
    )
    at = extrapolate(cfg.steps, DEFAULT_S, (plain_s, plain_cpu), (probe_s, probe_cpu), stats_cpu)
    print(
        f"at the default S={DEFAULT_S}, derived from these figures (the statistics are a fixed "
        f"cost per probe, the steps scale with S): probe vs plain {at[0]:.3f}x wall, "
        f"{at[1]:.3f}x CPU"
    )
    print(
        f"effective ranks alone ({len(grads)} gradients): raw {erank_s:.3f} s, "
        f"signal {signal_s:.3f} s"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"process max RSS over the whole run (host memory, not per phase): {rss:,.0f} MiB")
    if plain_peak is not None and off_peak is not None:
        verdict = "meets" if off_peak <= plain_peak else "MISSES"
        print(f'peak with offload="cpu" {verdict} the target (<= plain peak)')
    return {
        "config": cfg,
        "device": device,
        "plain_s": plain_s,
        "probe_s": probe_s,
        "probe_offload_s": off_s,
        "ratio": probe_s / plain_s,
        "ratio_offload": off_s / plain_s,
        "ratio_cpu": probe_cpu / plain_cpu,
        "ratio_offload_cpu": off_cpu / plain_cpu,
        "stats_s": stats_s,
        "stats_cpu": stats_cpu,
        "ratio_at_default": at,
        "erank_s": erank_s,
        "signal_erank_s": signal_s,
        "runs": runs,
        "shape": args.shape,
        "peak_plain_mib": plain_peak,
        "peak_probe_mib": probe_peak,
        "peak_offload_mib": off_peak,
        "modules": len(grads),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
