"""Planning time of every planner on synthetic statistics, next to plain LoRA's in the same run.

    python bench/speed/planner.py           # 32 layers × 4 module types (Llama-7B attention shapes)
    python bench/speed/planner.py --smoke    # 4 layers × 2 types, a few repeats (CI)

Then ``auto`` (METHODS.md §7, issue 32) on a Llama-3-8B-shaped model: 32 layers × 7 linear
types (q, k, v, o, gate, up, down at their real shapes), 128 signal singular values per module,
r_max 64, the budget of LoRA r=8 on q/k/v/o; the target is ≤ 50 ms.

Statistics are built directly from synthetic ``ModuleStats`` (per-layer σ drifting in blocks,
random erank and sensitivity): planners need no gradients for the RMI similarity, so this times
the planner alone (similarity matrix, partition, allocation, plan construction). Figures are
medians (and the best call, which shows the planner's own cost on a busy machine) over
``--repeats`` calls; ratios are against ``plan_lora`` measured in the same run. The target
(issue 3): the greedy E²LoRA planner on 32 layers × 4 types takes ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = (
    ("lora", {}),
    ("e2lora", {}),
    ("e2lora", {"partition": "dp"}),
    ("e2sharelora", {}),
    ("ralora", {}),
    ("ralora_pro", {}),
)


@dataclass
class Result:
    method: str
    options: dict
    modules: int
    intervals: int | None
    median_ms: float
    best_ms: float


def synthetic_stats(layers: int, types: int, d: int = 4096, seed: int = 0):
    """GradientStats of ``layers × types`` modules: σ in blocks of ~4 layers, random erank/I."""
    from entrolora.stats import HALF_LOG_2PI_PLUS_HALF, GradientStats, ModuleStats

    rng = random.Random(seed)
    mods = {}
    for t in TYPES[:types]:
        sigma = 1e-4
        for i in range(layers):
            if i % 4 == 0:
                sigma = 1e-4 * math.exp(rng.uniform(-1.5, 1.5))
            sd = sigma * math.exp(rng.gauss(0, 0.02))
            name = f"model.layers.{i}.self_attn.{t}"
            mods[name] = ModuleStats(
                name=name, module_type=f"model.layers.*.self_attn.{t}", layer=i, shape=(d, d),
                numel=d * d, mean=rng.gauss(0, 1e-6), std=sd,
                entropy=math.log(sd) + HALF_LOG_2PI_PLUS_HALF, erank=rng.uniform(4, 400),
                sensitivity=rng.uniform(1e-6, 1e-4),
            )  # fmt: skip
    return GradientStats(modules=mods)


def time_planner(stats, method: str, options: dict, repeats: int) -> tuple[float, float, object]:
    from entrolora.planners import plan

    plan(method, stats, **options)  # warm-up: imports, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = plan(method, stats, **options)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), p


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny statistics, few repeats (CI)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    layers, types, repeats = (4, 2, 3) if args.smoke else (args.layers, 4, args.repeats)
    stats = synthetic_stats(layers, types, d=64 if args.smoke else 4096)
    label = "smoke" if args.smoke else f"{layers} layers × {types} types"
    print(f"planner time on synthetic statistics ({label}), median of {repeats} calls")
    results = []
    for method, options in CASES:
        ms, best, p = time_planner(stats, method, options, repeats)
        diag = p.options.get("types")
        k = sum(len(v["intervals"]) for v in diag.values()) if diag else None
        results.append(Result(method, options, len(p.modules), k, ms, best))
    base = results[0].median_ms
    for r in results:
        opts = ",".join(f"{k}={v}" for k, v in r.options.items()) or "defaults"
        extra = f"  intervals {r.intervals}" if r.intervals is not None else ""
        print(
            f"  {r.method:<12} {opts:<14} median {r.median_ms:8.3f} ms  best {r.best_ms:8.3f} ms  "
            f"{r.median_ms / base:6.1f}× plan_lora  ({r.modules} modules){extra}"
        )
    greedy = results[1].median_ms
    verdict = "meets" if greedy <= 10.0 else "misses"
    print(f"greedy E²LoRA: {greedy:.3f} ms, {verdict} the ≤ 10 ms target ({label})")
    results.append(time_auto(4 if args.smoke else args.layers, repeats))
    return results


# Llama-3-8B's linear layers: (path, d_out, d_in)
LLAMA8B = (
    ("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 1024, 4096),
    ("self_attn.v_proj", 1024, 4096), ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 14336, 4096), ("mlp.up_proj", 14336, 4096), ("mlp.down_proj", 4096, 14336),
)  # fmt: skip


def auto_stats(layers: int, keep: int = 128, seed: int = 0):
    """GradientStats of ``layers`` × 7 Llama-8B-shaped modules with signal spectra: a power law
    per module (scale and decay drawn per module), the tail clipped to 0 as noise removal does."""
    from entrolora.stats import HALF_LOG_2PI_PLUS_HALF, GradientStats, ModuleStats

    rng = random.Random(seed)
    mods = {}
    for path, d_out, d_in in LLAMA8B:
        for i in range(layers):
            scale, decay = math.exp(rng.uniform(-2, 2)), rng.uniform(0.3, 1.5)
            live = rng.randint(keep // 4, keep)
            sv = tuple(scale * k**-decay if k <= live else 0.0 for k in range(1, keep + 1))
            name = f"model.layers.{i}.{path}"
            mods[name] = ModuleStats(
                name=name, module_type=f"model.layers.*.{path}", layer=i, shape=(d_out, d_in),
                numel=d_out * d_in, mean=0.0, std=1e-4, entropy=HALF_LOG_2PI_PLUS_HALF - 9.2,
                erank=10.0, sensitivity=None, noise_mean=0.0, noise_std=1e-4, snr=1.0,
                signal_std=1e-4, signal_entropy=HALF_LOG_2PI_PLUS_HALF - 9.2, signal_erank=10.0,
                spectrum=sv, signal_spectrum=sv,
            )  # fmt: skip
    per_rank = layers * sum(d_out + d_in for p, d_out, d_in in LLAMA8B[:4])
    meta = {"like_lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                          "params_per_rank": per_rank}}  # fmt: skip
    return GradientStats(modules=mods, meta=meta)


def time_auto(layers: int, repeats: int) -> Result:
    """Median planning time of ``auto`` (budget like-lora=8, r_max 64) on ``auto_stats``."""
    stats = auto_stats(layers)
    ms, best, p = time_planner(stats, "auto", {}, repeats)
    units = sum(min(64, sum(v > 0 for v in m.signal_spectrum)) for m in stats.modules.values())
    print(
        f"auto, {layers} layers × 7 types (Llama-3-8B shapes, {units} units, budget like-lora=8 "
        f"= {p.options['budget']:,}): median {ms:.3f} ms  best {best:.3f} ms; "
        f"{len(p.modules)} of {len(stats)} modules adapted; "
        f"{'meets' if ms <= 50.0 else 'misses'} the ≤ 50 ms target"
    )
    return Result("auto", {}, len(p.modules), None, ms, best)


if __name__ == "__main__":
    main()
