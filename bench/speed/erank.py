"""Effective rank at 8B shapes: exact (float64 Gram eigenvalues) against the fast estimator.

    python bench/speed/erank.py                 # 4096×4096, 1024×4096, 14336×4096; 1 thread
    python bench/speed/erank.py --smoke         # one 1600×1300 matrix, 1 seed (CI)
    python bench/speed/erank.py --spectra real --statistics raw   # real gradients' spectra only
    python bench/speed/erank.py --write-profiles minilm.safetensors,smollm2.safetensors
    python bench/speed/erank.py --compare probe_steps=16/probe_steps=32 --seeds 4  # variants

Two families of spectra. ``synthetic``: a decaying mean gradient ``μ = U diag(i^-α) Vᵀ`` over
``r = k/4`` random orthonormal directions (α = 0.5, 1, 1.5), plus the sampling noise of a
64-step probe. Each of the 64 step gradients is ``μ + ε_t`` with i.i.d. Gaussian ``ε_t`` of
norm ``ν·‖μ‖`` (ν = 4: one step's noise four times the mean, as in small-batch fine-tuning);
the halves of 32 steps give ``G = μ + (e₁ + e₂)/2`` and the probe's noise estimate
``D = (e₁ − e₂)/2`` (METHODS.md §2), so ``‖G − μ‖ ≈ ν/√64·‖μ‖ = 0.5‖μ‖``: a noise floor under
the decaying spectrum. ``real``: the singular values of real probe gradients (``PROFILES``:
MiniLM's and SmolLM2-135M's targets at their first, middle and last layer, from ``entrolora
probe`` statistics files by ``--write-profiles``), interpolated in log σ over the relative
index to the shape's smaller side, between random orthonormal directions. Real gradients'
singular values fall steeply towards 0 (effective rank 1–55 % of the side), where the
synthetic noise floor keeps ~75 %: the harder case for Gauss quadrature of √λ. Both
statistics are timed: the raw effective rank of G, and the signal one (G Gᵀ − D Dᵀ; synthetic
only, the profiles carry no noise estimate). Exact and fast run
alternately on the same matrix (the machine is shared: the ratio is the figure to read), in one
torch thread by default so that other processes cannot turn LAPACK's thread barriers into
waits; CPU seconds of this process are printed beside the wall clock.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402
from common import decaying_mean  # noqa: E402
from entrolora.stats import slq, spectral  # noqa: E402

PROFILES = Path(__file__).resolve().parents[1] / "data" / "erank-profiles.safetensors"

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096))
# Targets of one Llama-3-8B layer by shape (q, o; k, v; gate, up and down, whose 4096 × 14336
# has 14336 × 4096's singular values); 32 layers: the 224 matrices of the issue.
LAYER_COUNTS = {"4096x4096": 2, "1024x4096": 2, "14336x4096": 3}
LAYERS = 32
ALPHAS = (0.5, 1.0, 1.5)
STEPS, NU = 64, 4.0


def gradient_pair(m: int, n: int, alpha: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, D)`` float32 ``(m, n)``: decaying mean gradient + 64-step probe noise (docstring)."""
    gen = torch.Generator().manual_seed(seed)
    mu = decaying_mean(m, n, alpha, gen)
    # each half is the mean of 32 steps: its noise has norm ν‖μ‖/√32
    scale = NU * mu.norm() / math.sqrt(STEPS / 2) / math.sqrt(m * n)
    e1 = torch.randn(m, n, generator=gen) * scale
    e2 = torch.randn(m, n, generator=gen) * scale
    g = mu.add_(e1.add(e2).mul_(0.5))
    d = e1.sub_(e2).mul_(0.5)
    return g, d


def write_profiles(stats_files: list[str], out: Path = PROFILES) -> dict[str, torch.Tensor]:
    """Singular values (÷ σ₁, float32, descending) of the kept gradients of ``entrolora probe``
    statistics files, for the first, middle and last layer, saved to ``out`` under
    ``<file stem>/<module name>``; returns them."""
    from safetensors.torch import save_file

    from entrolora import GradientStats

    profiles = {}
    for path in stats_files:
        grads = GradientStats.load(path).gradients
        layer = {n: int(m.group(1)) for n in grads if (m := re.search(r"\.(\d+)\.", n))}
        last = max(layer.values())
        for name, g in grads.items():
            if layer.get(name) in (0, last // 2, last):
                sv = torch.linalg.svdvals(g.to(torch.float64))
                profiles[f"{Path(path).stem}/{name}"] = (sv / sv[0]).to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(profiles, out)
    return profiles


def load_profiles(path: Path = PROFILES) -> dict[str, torch.Tensor]:
    """``write_profiles``' singular values by ``<model>/<module>``, in name order."""
    from safetensors.torch import load_file

    return dict(sorted(load_file(path).items()))


def profile_values(sv: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` float64 singular values following the profile ``sv``: log σ linearly interpolated
    at the same relative index ``(i + ½)/k``."""
    src = (torch.arange(len(sv), dtype=torch.float64) + 0.5) / len(sv)
    dst = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    logs = sv.to(torch.float64).clamp_min(1e-30).log()
    hi = torch.searchsorted(src, dst).clamp(1, len(sv) - 1)
    w = ((dst - src[hi - 1]) / (src[hi] - src[hi - 1])).clamp(0, 1)
    return torch.exp(logs[hi - 1] * (1 - w) + logs[hi] * w)


def profile_matrix(sv: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float32 ``(m, n)`` matrix ``U diag(σ) Vᵀ`` with random orthonormal U, V whose
    singular values are ``profile_values(sv, min(m, n))``."""
    k = min(m, n)
    sigma = profile_values(sv, k).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    return (u * sigma) @ v.mT


def timed(fn):
    """``(result, wall s, CPU s of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(g, d, seeds: int) -> dict:
    """Exact and fast effective rank of ``G`` (or the signal, with ``d``), interleaved."""
    noises = None if d is None else [d]
    exact, fast, errs = [], [], []
    value = None
    for seed in range(seeds):
        value, *t_exact = timed(lambda: spectral.effective_ranks([g], noises, method="exact")[0])
        est, *t_fast = timed(
            lambda s=seed: spectral.effective_ranks([g], noises, method="fast", seed=s)[0]
        )
        exact.append(t_exact)
        fast.append(t_fast)
        errs.append(est / value - 1)
    med = {
        key: statistics.median(x[i] for x in runs)
        for key, runs, i in (
            ("exact_wall", exact, 0),
            ("exact_cpu", exact, 1),
            ("fast_wall", fast, 0),
            ("fast_cpu", fast, 1),
        )
    }
    return {"exact": value, "max_err": max(errs, key=abs), "errs": errs, **med}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one small matrix (CI)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seeds", type=int, default=2, help="estimator seeds per matrix")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,1024x4096")
    ap.add_argument("--alphas", default=None, help="spectral decay exponents, e.g. 0.5,1")
    ap.add_argument("--statistics", default="raw,signal", help="raw, signal or both")
    ap.add_argument("--spectra", default="synthetic,real", help="synthetic, real or both")
    ap.add_argument(
        "--write-profiles", default=None, help="statistics files: write PROFILES and stop"
    )
    ap.add_argument(
        "--compare",
        default=None,
        help="e.g. probe_steps=16/probes=32,extrapolate=0: FAST_RAW with these fields changed, "
        "--seeds seeds each, on every real profile at the first --shapes, then stop",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.write_profiles:
        for name, sv in write_profiles(args.write_profiles.split(",")).items():
            erank = spectral.erank_from_singular_values(sv[None].double()).item()
            print(f"{name:60s} {len(sv):5d} values, erank {erank:7.1f}")
        return []
    torch.set_num_threads(args.threads)
    if args.compare:
        m, n = (int(x) for x in (args.shapes or "4096x4096").split(",")[0].split("x"))
        settings = [parse_setting(x) for x in args.compare.split("/")]
        return compare(load_profiles(), m, n, settings, args.seeds)
    shapes, alphas = SHAPES, ALPHAS
    profiles = load_profiles() if "real" in args.spectra.split(",") else {}
    if "synthetic" not in args.spectra.split(","):
        alphas = ()
    if args.smoke:  # smallest shape above both estimators' Krylov dimensions
        shapes, alphas = ((1600, 1300),), alphas and (1.0,)
        profiles = dict(list(profiles.items())[:1])
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))
    if args.alphas:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    info = common.machine_info(torch.device("cpu"))
    print(f"# {common.describe(info)}")
    print(
        f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; fast = "
        f"erank_estimate, raw {slq.FAST_RAW}, signal {slq.FAST_SIGNAL}; "
        f"effective_ranks uses it for the raw statistic from min side {spectral.FAST_MIN_SIDE}"
    )
    print(
        f"# medians over {args.seeds} interleaved exact/fast pair(s); err = fast/exact − 1, "
        "the largest over the seeds; spectrum: α of the synthetic one or the real profile"
    )
    print(
        f"{'shape':>11} {'spectrum':>44} {'statistic':>9} {'exact erank':>11} {'err':>8} "
        f"{'exact s':>8} {'fast s':>7} {'×':>6} {'exact cpu':>9} {'fast cpu':>8} {'×cpu':>6}"
    )
    rows = []
    for m, n in shapes:
        for spectrum, alpha, g, d in cases(m, n, alphas, profiles):
            for stat, noise in (("raw", None), ("signal", d)):
                if stat not in args.statistics.split(",") or (stat == "signal" and d is None):
                    continue
                r = measure(g, noise, args.seeds)
                r.update(shape=f"{m}x{n}", alpha=alpha, spectrum=spectrum, statistic=stat)
                rows.append(r)
                print(
                    f"{r['shape']:>11} {spectrum:>44} {stat:>9} {r['exact']:11.1f} "
                    f"{100 * r['max_err']:+7.2f}% {r['exact_wall']:8.2f} {r['fast_wall']:7.2f} "
                    f"{r['exact_wall'] / r['fast_wall']:6.1f} {r['exact_cpu']:9.2f} "
                    f"{r['fast_cpu']:8.2f} {r['exact_cpu'] / r['fast_cpu']:6.1f}",
                    flush=True,
                )
    for line in whole_model(rows) + real_summary(rows):
        print(line)
    print(f"# load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


def parse_setting(text: str) -> slq.FastErank:
    """``FAST_RAW`` with the fields ``name=value,...`` of ``text`` changed (``""``: unchanged);
    each value is read as the type of the field's default."""
    changes = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        default = getattr(slq.FAST_RAW, name, None)
        if default is None or isinstance(default, torch.dtype):
            raise ValueError(f"--compare: {name!r} is no int, float or bool of FastErank")
        changes[name] = bool(int(value)) if isinstance(default, bool) else type(default)(value)
    return replace(slq.FAST_RAW, **changes)


def compare(
    profiles: dict[str, torch.Tensor],
    m: int,
    n: int,
    settings: list[slq.FastErank],
    seeds: int,
) -> list[dict]:
    """The raw estimate's error under each of ``settings`` with seeds ``0..seeds-1`` on the same
    ``(m, n)`` matrix of every profile, against the effective rank of the profile's own singular
    values (float64: no exact eigenvalues needed). Prints per profile and setting the mean and
    the largest error over the seeds; per setting a summary that splits the error into bias
    (rms over profiles of the mean) and spread (rms of the standard deviation over the seeds),
    with the median CPU seconds of one estimate. Returns ``[{name, erank, errors}]``, errors
    one list per setting."""
    print(f"# at {m}x{n}, seeds 0..{seeds - 1}; err = estimate/erank − 1; settings:")
    for j, p in enumerate(settings):
        print(f"#   {j}: {p}")
    print(
        f"{'profile':52s} {'erank':>8} "
        + " ".join(f"{f'{j}: mean  max':>16}" for j in range(len(settings)))
    )
    rows, cpu = [], [[] for _ in settings]
    for name, sv in profiles.items():
        g = profile_matrix(sv, m, n)
        want = spectral.erank_from_singular_values(profile_values(sv, min(m, n))[None]).item()
        errs = []
        for j, p in enumerate(settings):
            got = [timed(partial(slq.erank_estimate, g, seed=s, params=p)) for s in range(seeds)]
            errs.append([e / want - 1 for e, _, _ in got])
            cpu[j] += [c for _, _, c in got]
        rows.append({"name": name, "erank": want, "errors": errs})
        cells = (f"{statistics.mean(e):+7.2%} {max(e, key=abs):+7.2%}" for e in errs)
        print(f"{name:52s} {want:8.1f} " + " ".join(cells), flush=True)
    for j in range(len(settings)):
        e = [r["errors"][j] for r in rows]
        flat = [x for xs in e for x in xs]
        bias = math.sqrt(statistics.mean(statistics.mean(xs) ** 2 for xs in e))
        spread = math.sqrt(statistics.mean(statistics.pvariance(xs) for xs in e))
        print(
            f"# {j}: within 1 %: {sum(abs(x) < 0.01 for x in flat)}/{len(flat)} estimates, "
            f"{sum(all(abs(x) < 0.01 for x in xs) for xs in e)}/{len(e)} profiles at every seed; "
            f"largest {max(flat, key=abs):+.2%}; bias {bias:.2%} rms, spread {spread:.2%} rms; "
            f"{statistics.median(cpu[j]):.2f} CPU s median"
        )
    return rows


def cases(m: int, n: int, alphas, profiles: dict[str, torch.Tensor]):
    """``(spectrum, α or None, G, D or None)`` for each synthetic α and real profile, built one
    at a time (a 14336 × 4096 matrix is 235 MB)."""
    for a in alphas:
        yield (f"α {a}", a, *gradient_pair(m, n, a))
    for name, sv in profiles.items():
        yield name, None, profile_matrix(sv, m, n), None


def real_summary(rows: list[dict]) -> list[str]:
    """Per shape, over the real profiles' raw rows: how many are within 1 % at every seed, the
    largest error and the CPU-time ratios."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        got = [r for r in rows if r["shape"] == shape and r["alpha"] is None]
        if got:
            worst = max((r["max_err"] for r in got), key=abs)
            within = sum(abs(r["max_err"]) < 0.01 for r in got)
            ratios = sorted(r["exact_cpu"] / r["fast_cpu"] for r in got)
            lines.append(
                f"# real profiles at {shape}: {within}/{len(got)} within 1 % at every seed, "
                f"largest error {100 * worst:+.2f} %, ×cpu {ratios[0]:.1f}–{ratios[-1]:.1f} "
                f"(median {statistics.median(ratios):.1f})"
            )
    return lines


def whole_model(rows: list[dict]) -> list[str]:
    """The raw statistic of all 224 targets of an 8B model, per α where every shape was timed:
    CPU seconds exact against ``method="auto"`` (the estimator from ``FAST_MIN_SIDE``)."""
    lines = []
    for alpha in sorted({r["alpha"] for r in rows} - {None}):
        got = {r["shape"]: r for r in rows if r["alpha"] == alpha and r["statistic"] == "raw"}
        if not set(LAYER_COUNTS) <= set(got):
            continue
        exact = auto = 0.0
        for shape, count in LAYER_COUNTS.items():
            r = got[shape]
            fast = min(int(x) for x in shape.split("x")) >= spectral.FAST_MIN_SIDE
            exact += LAYERS * count * r["exact_cpu"]
            auto += LAYERS * count * (r["fast_cpu"] if fast else r["exact_cpu"])
        lines.append(
            f"# 8B model, all {LAYERS * sum(LAYER_COUNTS.values())} targets, α {alpha}, raw: "
            f"exact {exact:.0f} CPU s, auto {auto:.0f} CPU s, {exact / auto:.1f}×"
        )
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
