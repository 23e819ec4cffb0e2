"""stability.py's table: how many types and modules come out the same across the K subsets.

Split from ``stability.py`` (which re-exports ``identical_share`` and ``table``); reads the
records ``stability.plans_of`` writes, probes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Mapping, Sequence

import torch

from common import describe, machine_info

READINGS = ("raw", "signal")


def identical_keys(maps: Sequence[Mapping]) -> tuple[int, int]:
    """``(keys whose values are identical in every map, keys)``, the keys those of the first."""
    keys = list(maps[0])
    same = sum(len({json.dumps(m[k]) for m in maps}) == 1 for k in keys)
    return same, len(keys)


def identical_share(records: Sequence[dict], reading: str, what: str) -> tuple[int, int]:
    """``(items identical across all records, items)`` for ``what`` of ``reading``."""
    return identical_keys([r[reading][what] for r in records])


def near_share(records: Sequence[dict], reading: str) -> tuple[int, int]:
    """``(types whose E²LoRA ranks are within one unit of each other across all records, types)``:
    the same number of intervals, and every interval's ranks spanning at most one unit."""
    maps = [r[reading]["ranks"] for r in records]
    near = 0
    for t in maps[0]:
        ranks = [m[t] for m in maps]
        same_k = len({len(v) for v in ranks}) == 1
        near += same_k and all(max(col) - min(col) <= 1 for col in zip(*ranks))
    return near, len(maps[0])


def share_sd_median(records: Sequence[dict], reading: str) -> float | None:
    """The median one-probe sd of HRA's real shares (``rank_noise.share_cov``), if recorded."""
    sds = [v for r in records for vs in r[reading].get("share_sd", {}).values() for v in vs]
    return statistics.median(sds) if sds else None


def summary_rows(records: Sequence[dict], groups: Sequence[tuple]) -> list[str]:
    lines = []
    head = (f"{'model':<9} {'S':>4} {'K':>2} {'seeds':<7} {'head':<8} {'head-fit':>8} "
            f"{'reading':<14} {'E²LoRA intervals':>17} {'E²LoRA ranks':>14} {'ranks ±1':>12} "
            f"{'share sd':>8} {'RaLoRA blocks':>15} {'median SNR':>10} undecided")  # fmt: skip
    lines.append(head)
    for model, steps, seeds, probe_head, head_fit in groups:
        rec = [r for r in records if _group(r) == (model, steps, seeds, probe_head, head_fit)]
        if len(rec) < 2:
            continue
        snr = statistics.median(v for r in rec for v in r["snr"].values() if v is not None)
        group = f"{model:<9} {steps:>4} {len(rec):>2} {seeds:<7} {probe_head:<8} {head_fit:>8}"
        for reading in [*READINGS, *(["greedy"] if all("greedy" in r for r in rec) else [])]:
            counts = [identical_share(rec, reading, "intervals"),
                      identical_share(rec, reading, "ranks"), near_share(rec, reading)]  # fmt: skip
            cells = [
                f"{a}/{b} ({100 * a / b:.0f} %)".rjust(w) for (a, b), w in zip(counts, (17, 14, 12))
            ]
            sd = share_sd_median(rec, reading)
            cells.append(f"{sd:8.3f}" if sd is not None else f"{'':8}")
            same, total = identical_share(rec, reading, "blocks")
            cells.append(f"{same}/{total} ({100 * same / total:.0f} %)".rjust(15))
            used = rec[0][reading]["used"]
            if rec[0][reading].get("boundaries", "greedy") == "greedy":
                used += "/greedy"
            undecided = [sum(v or 0 for v in r[reading].get("undecided", {}).values()) for r in rec]
            gate = f" {min(undecided)}–{max(undecided)}" if any(undecided) else ""
            lines.append(f"{group} {used:<14} {' '.join(cells)} {snr:>10.2f}{gate}")
        if all("edge" in r for r in rec):
            same, total = identical_share(rec, "edge", "blocks")
            blocks = f"{same}/{total} ({100 * same / total:.0f} %)"
            lines.append(f"{group} {'edge':<14} {'as signal':>17} {'as signal':>14} {'':>12} "
                         f"{'':>8} {blocks:>15} {snr:>10.2f}")  # fmt: skip
    return lines


def _group(record: dict) -> tuple:
    p = record["probe"]
    return p["model"], record["size"], record["seeds"], p.get("probe_head", "model"), p["head_fit"]


def table(records: Sequence[dict], args: argparse.Namespace, argv: list[str] | None) -> str:
    groups = list(dict.fromkeys(_group(r) for r in records))
    info = machine_info(torch.device("cpu"))
    cmd = "python bench/stability/stability.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    return "\n".join(
        [f"# {cmd.strip()}", f"# {describe(info)}; load average {os.getloadavg()[0]:.1f}",
         f"# batch {args.batch_size}, max length {args.max_length}, blocks of {args.block}, "
         "r = 8, E²LoRA and RaLoRA defaults; shares identical across all K subsets",
         *(["# table rewritten from the JSONL: the passes were probed before this date"]
           if args.table_only else []), "",
         *summary_rows(records, groups)]
    )  # fmt: skip
