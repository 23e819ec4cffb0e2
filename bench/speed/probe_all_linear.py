"""What probing every linear layer (auto's candidates, METHODS.md §7) costs against the default
targets: wall time and peak memory of the probe on the embedded MiniLM.

    python bench/speed/probe_all_linear.py               # 16 probe steps, batch 32, max length 64
    python bench/speed/probe_all_linear.py --steps 64    # the default probe length
    python bench/speed/probe_all_linear.py --smoke       # 2 steps (CI)

Each target set runs in a fresh Python process (so that its peak RSS is its own): model and data
load, then ``job.probe.run_probe`` (the probe's passes and the statistics, spectra included) is
timed. Reported: resident memory before the probe, the process's peak RSS, the probe's wall
time, and the statistics' size (modules, float32 gradients and noise estimates kept in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TARGET_SETS = ("default", "all-linear")


def rss_mib() -> float:
    """Current resident memory of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(targets: str, steps: int) -> dict:
    """Load MiniLM and the default data, probe ``targets`` for ``steps`` batches; figures."""
    import torch

    from entrolora.job import TrainConfig, default_targets, load_model, load_splits, run_probe

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = TrainConfig(probe_steps=steps, progress=False, device="cpu")
    train_ds, _ = load_splits(cfg)
    model, tokenizer, _ = load_model(None, "classify", 2)
    names = default_targets(model) if targets == "default" else ["all-linear"]
    before = rss_mib()
    t0 = time.perf_counter()
    stats = run_probe(model, tokenizer, train_ds, names, cfg, torch.device("cpu"), report=False)
    seconds = time.perf_counter() - t0
    kept = sum(g.numel() for g in stats.gradients.values()) * 4 * 2  # G and D, float32
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"targets": targets, "modules": len(stats), "steps": stats.steps,
            "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
            "probe_s": round(seconds, 2), "kept_mib": round(kept / 2**20, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="2 probe steps")
    ap.add_argument("--one", choices=TARGET_SETS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    if args.one:
        print(json.dumps(one(args.one, steps)))
        return []
    rows = []
    for targets in TARGET_SETS:
        cmd = [sys.executable, __file__, "--one", targets, "--steps", str(steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"MiniLM probe, {steps} steps of batch 32 × 64 tokens, CPU, each in a fresh process")
    for r in rows:
        print(
            f"  {r['targets']:<10} {r['modules']:>3} modules  probe {r['probe_s']:7.2f} s  "
            f"RSS before {r['rss_before_mib']:7.1f} MiB  peak {r['peak_rss_mib']:7.1f} MiB  "
            f"G+D kept {r['kept_mib']:6.1f} MiB"
        )
    return rows


if __name__ == "__main__":
    main()
