"""How fast is it? The probe, adapter, FlexLoRA, planner and erank benchmarks under one entry point.

    python bench/speed/speed.py             # GPU when available, else the CPU (medians of 20 steps)
    python bench/speed/speed.py --smoke          # every script's --smoke (tiny models, CI)
    python bench/speed/speed.py --only probe,flexlora

Each benchmark is its own script in bench/ with a ``main(argv)`` that prints its table (figures
and ratios against its peer measured in the same run: the probe against a plain
forward+backward, every adapter kind and FlexLoRA against peft LoRA of the same rank, the
planners' wall time). This file imports each script, runs it, shows its output and writes that
output verbatim to ``bench/results/speed-<device>/<name>.txt`` (with the machine and the
command), so that docs/benchmarks.md can include the measured tables as they were printed.
A script that is missing or fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402
from entrolora.files import atomic_write_text  # noqa: E402

BENCH = Path(__file__).resolve().parents[1]
RESULTS = BENCH / "results"
SCRIPTS = ("probe", "adapters", "flexlora", "planner", "erank")
# where each lives under bench/
FOLDERS = {
    "probe": "speed",
    "adapters": "speed",
    "flexlora": "flexlora",
    "planner": "speed",
    "erank": "speed",
}
# Extra arguments on a CPU without --smoke: the scripts size themselves for a GPU or a smoke run;
# on the CPU we ask for the issue's ≥ 20 timed steps after warm-up.
CPU_ARGS: dict[str, list[str]] = {
    "probe": ["--steps", "20", "--warmup", "3"],
    "adapters": ["--steps", "20", "--warmup", "3"],
    "flexlora": ["--steps", "20", "--warmup", "3"],
    "planner": [],
    "erank": [],
}


@dataclass
class Outcome:
    """What one benchmark script did: ``ok``, ``missing`` or ``failed``, its output and value."""

    name: str
    status: str
    output: str
    value: Any = None
    seconds: float = 0.0  # wall time of the whole script, setup included


class _Tee(io.TextIOBase):
    """Write to the real stdout and keep a copy."""

    def __init__(self, stream: Any):
        self.stream, self.buf = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.buf.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def load_script(name: str, folder: Path | None = None) -> Any | None:
    """Import ``folder/<name>.py`` (default: its folder under bench/) as a module (None when the
    file does not exist)."""
    path = (folder or BENCH / FOLDERS.get(name, "speed")) / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return mod


def run_script(name: str, argv: list[str], folder: Path | None = None) -> Outcome:
    """Run ``folder/<name>.py``'s ``main(argv)``, capturing what it prints."""
    tee = _Tee(sys.stdout)
    try:
        mod = load_script(name, folder)
        if mod is None:
            return Outcome(
                name,
                "missing",
                f"bench/{FOLDERS.get(name, 'speed')}/{name}.py does not exist yet\n",
            )
        if not callable(getattr(mod, "main", None)):
            return Outcome(
                name, "failed", f"bench/{FOLDERS.get(name, 'speed')}/{name}.py has no main(argv)\n"
            )
        with contextlib.redirect_stdout(tee):
            value = mod.main(argv)
        return Outcome(name, "ok", tee.buf.getvalue(), value)
    except Exception:  # one broken benchmark must not hide the others' figures
        err = traceback.format_exc()
        print(err, file=sys.stderr)
        return Outcome(name, "failed", tee.buf.getvalue() + err)


def main(argv: Sequence[str] | None = None) -> dict[str, Outcome]:
    """Run the chosen benchmarks; writes their outputs under ``--results``; returns outcomes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="each script's --smoke (tiny, CPU)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--results", default=str(RESULTS), help="folder for speed-<device>/ outputs")
    ap.add_argument("--no-save", action="store_true", help="print only, write no files")
    args = ap.parse_args(argv)
    names = SCRIPTS
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = sorted(set(names) - set(SCRIPTS))
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(SCRIPTS)}")
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    info = common.machine_info(device)
    tag = "smoke" if args.smoke else ("gpu" if cuda else "cpu")
    outcomes: dict[str, Outcome] = {}
    for name in names:
        extra = ["--smoke"] if args.smoke else ([] if cuda else list(CPU_ARGS.get(name, [])))
        cmd = f"python bench/{FOLDERS[name]}/{name}.py {' '.join(extra)}".strip()
        print(f"\n=== {name}: {cmd}", flush=True)
        t0 = time.perf_counter()
        outcome = run_script(name, extra)
        outcome.seconds = time.perf_counter() - t0
        outcomes[name] = outcome
        if not args.no_save:
            text = (
                f"# {cmd}  (via: python bench/speed/speed.py{' --smoke' if args.smoke else ''})\n"
                f"# {common.describe(info)}\n# status: {outcome.status}\n\n{outcome.output}"
            )
            atomic_write_text(Path(args.results) / f"speed-{tag}" / f"{name}.txt", text)
    print("\n" + common.markdown_table(
        [{"benchmark": n, "status": o.status, "script s": f"{o.seconds:.1f}"}
         for n, o in outcomes.items()],
        ("benchmark", "status", "script s"),
    ))  # fmt: skip
    return outcomes


if __name__ == "__main__":
    outcomes = main()
    sys.exit(1 if any(o.status == "failed" for o in outcomes.values()) else 0)
