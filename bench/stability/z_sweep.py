"""E²LoRA's gate against its z: how identical the intervals of disjoint probes come out, and what
sharing it costs (issue 33).

    python bench/stability/z_sweep.py /work/stab/smollm2-stats  # a stability.py --stats-dir

Plans E²LoRA (r = 8, the library's defaults but ``z``) on every statistics file of the folder
(one per disjoint calibration subset, as ``stability.py --whole --stats-dir`` saves them) at each
z (z = 0: ``boundaries="greedy"``) and prints how many module types get identical intervals in
every subset, the intervals per type and the plans' parameter counts. No probing: seconds.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import entrolora as el
from entrolora.stats import GradientStats

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from stability_table import identical_keys  # noqa: E402


def sweep(folder: str, zs: list[float]) -> str:
    """The table for the statistics files of ``folder`` at each z of ``zs``."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if len(files) < 2:
        raise SystemExit(f"{folder} holds {len(files)} statistics files; the sweep needs two")
    stats = [GradientStats.load(f) for f in files]
    lines = [
        f"# python bench/stability/z_sweep.py {folder} --z {','.join(f'{z:g}' for z in zs)}",
        f"# {len(files)} disjoint probes ({', '.join(f.stem for f in files)}); E²LoRA r = 8",
        f"{'z':>4} {'intervals identical':>20} {'intervals per type':>19} {'params (each probe)'}",
    ]
    for z in zs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statistics without moment noise fall back, said
            gate = {"boundaries": "significant", "z": z} if z > 0 else {"boundaries": "greedy"}
            plans = [el.plan_e2lora(s, r=8, **gate) for s in stats]
        intervals = [{t: o["intervals"] for t, o in p.options["types"].items()} for p in plans]
        same, types = identical_keys(intervals)
        ks = [len(v) for m in intervals for v in m.values()]
        share = f"{same}/{types} ({100 * same / types:.0f} %)"
        per_type = f"{min(ks)}–{max(ks)} (mean {sum(ks) / len(ks):.1f})"
        params = ", ".join(f"{p.num_trainable_params():,}" for p in plans)
        lines.append(f"{z:>4g} {share:>20} {per_type:>19} {params}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="statistics files of disjoint probes (stability.py --stats-dir)")
    ap.add_argument("--z", default="0,1,2,3,4,6,8,12", help="comma-separated z (0: greedy)")
    args = ap.parse_args(argv)
    out = sweep(args.folder, [float(v) for v in args.z.split(",")])
    print(out)
    return out


if __name__ == "__main__":
    main()
