"""Wall time and peak memory of entrolora.probe next to plain forward+backward steps, same run.

    python bench/probe.py            # CUDA: Llama-1.1B shape, bf16, batch 8×512, q,k,v,o, 64 steps
    python bench/probe.py --smoke    # small Llama on the CPU, 8 steps (CI); also the CPU fallback

The peer is S plain steps of the same random model on the same random tokens: only the target
weights require grad, forward + ``loss.backward()``, then the gradients are dropped; warm-up
steps are excluded. The probe's time is the whole ``el.probe`` call, statistics included
(offload=None and offload="cpu"). Then the statistics alone (``GradientStats.from_gradients`` on
the accumulated gradients, on the model's device) and the effective ranks alone. Targets
(issue 2): probe ≤ 1.25× the plain steps; effective rank of all 88 gradients ≤ 1.3 s on an H100;
peak GPU memory with offload="cpu" ≤ the plain steps' peak. On the CPU, per-phase peak memory is
not measurable in-process: the script prints "n/a" and the process's max RSS for the whole run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

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


FULL = Config(22, 2048, 5632, 32, 4, 32000, 8, 512, 64, "bf16", 3, 1)
SMOKE = Config(4, 256, 688, 8, 2, 1024, 2, 64, 8, "fp32", 1, 3)


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small config on the CPU (CI)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    for field in Config.__dataclass_fields__:
        p.add_argument(f"--{field.replace('_', '-')}", default=None, type=str)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = SMOKE if (args.smoke or device == "cpu") else FULL
    values = {}
    for field, kind in ((f, type(getattr(base, f))) for f in Config.__dataclass_fields__):
        given = getattr(args, field)
        values[field] = kind(given) if given is not None else getattr(base, field)
    if values["dtype"] not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    args.device = device
    return Config(**values), args


def build(cfg: Config, device: str):
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


def measured(device: str, fn: Callable[[], object]) -> tuple[float, float | None, object]:
    """``(seconds, peak GPU MiB or None, result)`` of ``fn()``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return seconds, peak, out


def plain_steps(model, batches, targets) -> None:
    """Forward + backward with only the target weights requiring grad; gradients dropped."""
    for b in batches:
        model(**b).loss.backward()
        for w in targets:
            w.grad = None


def main(argv: list[str] | None = None) -> dict:
    import entrolora as el
    from entrolora.spectral import effective_ranks
    from entrolora.stats import GradientStats

    cfg, args = parse(argv)
    device = args.device
    targets = args.targets.split(",")
    model, batches = build(cfg, device)
    warm, timed = batches[: cfg.warmup], batches[cfg.warmup :]
    names = list(el.find_targets(model, targets))
    weights = [model.get_submodule(n).weight for n in names]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama {cfg.layers} layers, hidden {cfg.hidden}, intermediate {cfg.intermediate}, "
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
    # Phases interleaved, best of `repeats` each: a busy machine slows all of them alike.
    best: dict[str, tuple[float, float | None]] = {}
    stats = None
    for _ in range(cfg.repeats):
        for key, fn in (
            ("plain", run_plain),
            ("probe", lambda: run_probe(None)),
            ("offload", lambda: run_probe("cpu")),
        ):
            seconds, peak, out = measured(device, fn)
            if key == "probe":
                stats = out
            if key not in best or seconds < best[key][0]:
                best[key] = (seconds, peak)
    (plain_s, plain_peak), (probe_s, probe_peak), (off_s, off_peak) = (
        best["plain"],
        best["probe"],
        best["offload"],
    )

    # The statistics alone, from accumulator-like gradients on the model's device.
    grads = {n: g.to(device) for n, g in stats.gradients.items()}
    w_by_name = {n: model.get_submodule(n).weight.detach() for n in names}
    stats_s, _, _ = measured(
        device,
        lambda: GradientStats.from_gradients(grads, w_by_name, keep_gradients=False),
    )
    erank_s, _, _ = measured(device, lambda: effective_ranks(list(grads.values())))

    def mib(x: float | None) -> str:
        return "n/a (CPU)" if x is None else f"{x:,.0f} MiB"

    rows = [
        ("plain fwd+bwd x S", plain_s, plain_peak),
        ("probe offload=None", probe_s, probe_peak),
        ('probe offload="cpu"', off_s, off_peak),
    ]
    print(f"best of {cfg.repeats} interleaved repeat(s); {cfg.warmup} warm-up step(s) excluded")
    print(f"{'':24} {'wall s':>9} {'ms/step':>9} {'vs plain':>9} {'peak GPU mem':>16}")
    for label, s, peak in rows:
        print(f"{label:24} {s:9.3f} {1e3 * s / cfg.steps:9.1f} {s / plain_s:8.3f}x {mib(peak):>16}")
    print(f"statistics alone (from_gradients, {len(grads)} modules): {stats_s:.3f} s")
    print(f"effective ranks alone ({len(grads)} gradients): {erank_s:.3f} s")
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
        "stats_s": stats_s,
        "erank_s": erank_s,
        "peak_plain_mib": plain_peak,
        "peak_probe_mib": probe_peak,
        "peak_offload_mib": off_peak,
        "modules": len(grads),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
