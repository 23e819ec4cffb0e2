"""Do the papers' quality claims hold? A grid of methods × seeds trained by ``train_run``.

    python bench/quality.py --config cpu --jobs 2 --threads 1   # MiniLM subset, < 1 h on 2 cores
    python bench/quality.py --config gpu              # MiniLM, full data, for a GPU
    python bench/quality.py --config cpu --model smollm2   # SmolLM2-135M instead of MiniLM
    python bench/quality.py --smoke                   # tiny random BERT + tiny CSV, CI

Every cell is a method with its options (``CELLS``); all cells of a configuration share the
data (Rotten Tomatoes snippets, split by film), seed set, epochs, learning rate, batch size and
length, so the only difference between two cells is the adapter. Each (cell, seed) runs in its
own process (so that the CPU peak RSS is that run's own; ``--jobs N`` runs N at a time) and is
appended to ``bench/results/<config>/runs.csv`` as soon as it finishes; a rerun skips the
finished pairs.
After every run the summary is rewritten: ``table.md`` / ``table.csv`` (mean ± std over seeds),
``claims.md`` (each paper claim tested on the means) and ``accuracy_vs_params.png``.

The probe statistics of a seed are computed once (by the first cell that needs them, which
saves them with the probed gradients, ``TrainConfig.keep_gradients``) and reused by the later
cells of the same seed (``TrainConfig.stats``), the cosine / L1 / L2 similarity ablations
included; their cost is the ``probe s`` column of the cell that probed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from entrolora.files import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench-quality"  # run folders (adapters, plans): large, not committed
PROBE_FREE = ("lora", "sharelora", "flexlora", "peft-lora", "dora", "adalora", "vera", "lora-plus")


@dataclass(frozen=True)
class Cell:
    """One row of the table: a method, its rank and options, and the comparison it belongs to."""

    key: str  # stable id in runs.csv
    label: str
    method: str
    r: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    group: str = "methods"


CELLS: tuple[Cell, ...] = (
    # Ordered by the claims they test first, so that a partial grid answers the main ones.
    Cell("lora-r8", "LoRA r=8", "lora", 8),
    Cell("e2lora-r8", "E²LoRA r=8", "e2lora", 8),
    Cell("sharelora-r8", "ShareLoRA r=8", "sharelora", 8),
    Cell("e2sharelora-r8", "E²ShareLoRA r=8", "e2sharelora", 8),
    Cell("ralora-r8", "RaLoRA r=8", "ralora", 8),
    Cell("flexlora-r8", "FlexLoRA r=8 (capacity 2r)", "flexlora", 8),
    Cell("peft-adalora-r8", "peft AdaLoRA 12→8", "adalora", 8, {}, "peft"),
    Cell("lora-r4", "LoRA r=4", "lora", 4),
    Cell("ralora-pro-r8", "RaLoRA-Pro r_ref=8", "ralora-pro", 8),
    Cell("e2lora-r8-layers", "E²LoRA r=8 budget=layers", "e2lora", 8, {"budget": "layers"}),
    Cell("peft-lora-r8", "peft LoRA r=8", "peft-lora", 8, {}, "peft"),
    Cell("peft-dora-r8", "peft DoRA r=8", "dora", 8, {}, "peft"),
    Cell("peft-vera-r256", "peft VeRA r=256", "vera", 256, {}, "peft"),
    # E²LoRA Table 4 ablations (full method = e2lora-r8: LSS + HRA, RMI similarity).
    Cell("e2lora-lss-only", "E²LoRA LSS only", "e2lora", 8, {"allocation": "uniform"}, "table4"),
    Cell("e2lora-hra-only", "E²LoRA HRA only", "e2lora", 8, {"sharing": "none"}, "table4"),
    Cell("e2lora-cosine", "E²LoRA sim=cosine", "e2lora", 8, {"similarity": "cosine"}, "table4"),
    Cell("e2lora-l1", "E²LoRA sim=L1", "e2lora", 8, {"similarity": "l1"}, "table4"),
    Cell("e2lora-l2", "E²LoRA sim=L2", "e2lora", 8, {"similarity": "l2"}, "table4"),
    Cell("e2lora-kl", "E²LoRA sim=KL", "e2lora", 8, {"similarity": "kl"}, "table4"),
    # E²LoRA Table 5 (parameter-matched): e2lora-r8 vs lora-r4 above, and r=16 vs lora-r8.
    Cell("e2lora-r16", "E²LoRA r=16", "e2lora", 16, {}, "table5"),
)
SMOKE_CELLS = ("lora-r8", "e2lora-r8", "peft-lora-r8")


@dataclass(frozen=True)
class Setup:
    """Training settings shared by every cell of a configuration."""

    name: str
    model: str | None
    data: str | None
    seeds: tuple[int, ...]
    epochs: int
    limit: int | None
    max_length: int
    batch_size: int = 32
    lr: float = 2e-3
    probe_steps: int = 64
    max_steps: int | None = None
    cells: tuple[str, ...] = tuple(c.key for c in CELLS)
    isolate: bool = True  # one process per run, so that a CPU peak RSS is that run's own
    threads: int | None = None  # torch CPU threads per run (None: torch's default)
    only_seeds: tuple[int, ...] | None = None  # run just these now (tables still count ``seeds``)


CONFIGS = {
    # Sized for a 2-core machine: ≈ 70 s a run on one core, 20 cells × 3 seeds with --jobs 2
    # --threads 1 under an hour (measured in one go: docs/benchmarks.md).
    "cpu": Setup("cpu", None, None, (0, 1, 2), epochs=1, limit=2000, max_length=64,
                 probe_steps=16),
    "gpu": Setup("gpu", None, None, (0, 1, 2), epochs=3, limit=None, max_length=128,
                 probe_steps=64),
}  # fmt: skip

RUN_FIELDS = (
    "config", "cell", "label", "group", "method", "r", "options", "seed", "accuracy",
    "eval_loss", "trainable_params", "head_params", "plan_params", "probe_s", "train_s",
    "total_s", "steps", "peak_memory_mib", "peak_memory_kind", "train_examples",
    "test_examples", "stats_reused", "device", "torch_version", "machine", "finished",
)  # fmt: skip


# -- one run ----------------------------------------------------------------------------------
def train_config(setup: Setup, cell: Cell, seed: int, output: Path, stats: str | None) -> dict:
    """The ``TrainConfig`` fields of one (cell, seed) run, as a JSON-able dict."""
    return {
        "model": setup.model,
        "data": setup.data,
        "method": cell.method,
        "r": cell.r,
        "options": dict(cell.options),
        "probe_steps": setup.probe_steps,
        "stats": stats,
        "keep_gradients": probes(cell, stats),  # for the later cells' cosine/L1/L2 similarity
        "epochs": setup.epochs,
        "max_steps": setup.max_steps,
        "lr": setup.lr,
        "batch_size": setup.batch_size,
        "max_length": setup.max_length,
        "limit": setup.limit,
        "seed": seed,
        "output": str(output),
        "overwrite": True,
        "progress": False,
        "report": False,
    }


def worker(config_json: str, threads: int | None = None) -> None:
    """Subprocess entry: train one run (its metrics land in the run folder's metrics.json)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from entrolora.train import TrainConfig, train_run

    train_run(TrainConfig(**json.loads(config_json)))


def run_cell(setup: Setup, cell: Cell, seed: int, work: Path, stats: str | None) -> dict:
    """Train (cell, seed), in a fresh process when ``setup.isolate``; returns its runs.csv row.

    RuntimeError with the run's last output lines when the subprocess fails.
    """
    out = work / f"{cell.key}-seed{seed}"
    cfg = train_config(setup, cell, seed, out, stats)
    if setup.isolate:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
        threads = ["--threads", str(setup.threads)] if setup.threads else []
        if setup.threads:  # OpenMP spin-waits badly on a shared machine with too many threads
            env["OMP_NUM_THREADS"] = str(setup.threads)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg), *threads],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{cell.key} seed {seed} failed (exit {proc.returncode}):\n{tail}")
    else:
        worker(json.dumps(cfg), setup.threads)
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {
        "config": setup.name,
        "cell": cell.key,
        "label": cell.label,
        "group": cell.group,
        "method": cell.method,
        "r": cell.r,
        "options": json.dumps(dict(cell.options), sort_keys=True),
        "seed": seed,
        **{k: m.get(k) for k in RUN_FIELDS if k in m and k not in ("config", "method", "seed")},
        "stats_reused": bool(stats),
    }


def probes(cell: Cell, stats: str | None) -> bool:
    """Whether the run of ``cell`` given ``stats`` computes its seed's statistics itself."""
    return stats is None and cell.method not in PROBE_FREE


# -- the summary ------------------------------------------------------------------------------
def row_params(row: Mapping[str, str]) -> int:
    """Trainable adapter parameters of a run as its plan counts them (peft runs: peft's count).

    The plan count is the one ``train_run`` reports since FlexLoRA's was aligned with it: for
    FlexLoRA, its ``r`` active directions (+ λ), not the ``capacity`` it allocates.
    """
    return int(row.get("plan_params") or row["trainable_params"])


def params_text(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"  # plans can differ by seed (data)


def summarize(rows: Sequence[Mapping[str, str]], cells: Sequence[Cell]) -> list[dict]:
    """One dict per cell with any finished run: mean ± std accuracy and mean times/memory."""
    out = []
    for cell in cells:
        runs = [r for r in rows if r["cell"] == cell.key]
        if not runs:
            continue
        acc = [100 * float(r["accuracy"]) for r in runs]
        mean, std = common.mean_std(acc)
        mems = [float(r["peak_memory_mib"]) for r in runs if r.get("peak_memory_mib")]
        out.append(
            {
                "cell": cell,
                "n": len(runs),
                "seeds": sorted(int(r["seed"]) for r in runs),
                "acc_mean": mean,
                "acc_std": std,
                "params": [row_params(r) for r in runs],
                "head": int(runs[0]["head_params"] or 0),
                "train_s": common.mean_std([float(r["train_s"]) for r in runs])[0],
                "probe_s": max(float(r["probe_s"] or 0) for r in runs),
                "mem": max(mems) if mems else None,
            }
        )
    return out


def table_rows(summary: Sequence[Mapping[str, Any]], n_seeds: int) -> list[dict[str, str]]:
    return [
        {
            "method": s["cell"].label,
            "group": s["cell"].group,
            "trainable params": params_text(s["params"]),
            "accuracy % (mean ± std)": f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f}"
            if s["n"] > 1
            else f"{s['acc_mean']:.2f} (one seed)",
            "seeds": f"{s['n']}/{n_seeds}",
            "train s": f"{s['train_s']:.1f}",
            "probe s": f"{s['probe_s']:.1f}" if s["probe_s"] else "",
            "peak MiB": common.fmt(s["mem"], 0),
        }
        for s in summary
    ]


TABLE_COLUMNS = (
    "method", "group", "trainable params", "accuracy % (mean ± std)", "seeds", "train s",
    "probe s", "peak MiB",
)  # fmt: skip

# (claim, candidate cell, reference cell, kind, largest parameter ratio candidate/reference the
# claim allows or None): "beats" needs a higher mean; "matches" a mean no lower than the
# reference's by more than the noise (2 standard errors, at least 0.5 pp). A claim made "with
# fewer parameters" also fails when the candidate has more than the allowed ratio.
CLAIMS = (
    ("E²LoRA matches LoRA with about half the parameters (E²LoRA)", "e2lora-r8", "lora-r8",
     "matches", 0.75),
    ("E²ShareLoRA beats ShareLoRA with fewer parameters (E²LoRA)", "e2sharelora-r8",
     "sharelora-r8", "beats", 0.999),
    ("E²LoRA r=8 beats LoRA r=4 at matched parameters (E²LoRA Table 5)", "e2lora-r8", "lora-r4",
     "beats", None),
    ("E²LoRA r=16 beats LoRA r=8 at matched parameters (E²LoRA Table 5)", "e2lora-r16",
     "lora-r8", "beats", None),
    ("full E²LoRA beats LSS only (E²LoRA Table 4)", "e2lora-r8", "e2lora-lss-only", "beats", None),
    ("full E²LoRA beats HRA only (E²LoRA Table 4; not in the paper either)", "e2lora-r8",
     "e2lora-hra-only", "beats", None),
    ("RMI similarity beats cosine (E²LoRA Table 4)", "e2lora-r8", "e2lora-cosine", "beats", None),
    ("RMI similarity beats L1 (E²LoRA Table 4)", "e2lora-r8", "e2lora-l1", "beats", None),
    ("RMI similarity beats L2 (E²LoRA Table 4)", "e2lora-r8", "e2lora-l2", "beats", None),
    ("RMI similarity beats KL (E²LoRA Table 4)", "e2lora-r8", "e2lora-kl", "beats", None),
    ("RaLoRA beats LoRA at equal parameters (RaLoRA)", "ralora-r8", "lora-r8", "beats", None),
    ("RaLoRA-Pro beats LoRA (RaLoRA)", "ralora-pro-r8", "lora-r8", "beats", None),
    ("FlexLoRA beats AdaLoRA at equal budget (FlexLoRA)", "flexlora-r8", "peft-adalora-r8",
     "beats", None),
    ("entrolora LoRA matches peft LoRA (sanity)", "lora-r8", "peft-lora-r8", "matches", None),
)  # fmt: skip


def verdict(kind: str, delta: float, se: float, n: int) -> str:
    """``held`` / ``not held`` (and whether the gap exceeds 2 standard errors of the means)."""
    noise = 2 * se
    if kind == "beats":
        if delta > 0:
            return "held" if (n > 1 and delta > noise) else "held (within noise)"
        return "not held" if (n > 1 and -delta > noise) else "not held (within noise)"
    out = "held" if delta >= -max(0.5, noise) else "not held"
    return out if n > 1 else f"{out} (within noise)"  # one seed has no error bar


def claims_rows(
    rows: Sequence[Mapping[str, str]], cells: Sequence[Cell] = CELLS
) -> list[dict[str, str]]:
    """Each claim of ``CLAIMS`` tested on the seeds both of its cells finished.

    A seed fixes the data subset and split, so the two cells are compared pairwise: Δ is the
    mean over common seeds of (candidate − reference) accuracy, ± the standard error of those
    per-seed differences.
    """
    acc: dict[str, dict[int, float]] = {}
    params: dict[str, dict[int, int]] = {}
    for r in rows:
        acc.setdefault(r["cell"], {})[int(r["seed"])] = 100 * float(r["accuracy"])
        params.setdefault(r["cell"], {})[int(r["seed"])] = row_params(r)
    label = {c.key: c.label for c in cells}
    out = []
    for text, a, b, kind, max_ratio in CLAIMS:
        seeds = sorted(set(acc.get(a, {})) & set(acc.get(b, {})))
        if not seeds:
            out.append({"claim": text, "verdict": "pending (cells not run on a common seed yet)"})
            continue
        n = len(seeds)
        mean_a = sum(acc[a][s] for s in seeds) / n
        mean_b = sum(acc[b][s] for s in seeds) / n
        delta, sd = common.mean_std([acc[a][s] - acc[b][s] for s in seeds])
        se = sd / n**0.5
        ratio = sum(params[a][s] for s in seeds) / sum(params[b][s] for s in seeds)
        said = verdict(kind, delta, se, n)
        if max_ratio is not None and ratio > max_ratio:
            said = f"not held (parameter ratio {ratio:.2f} > {max_ratio:g}; accuracy: {said})"
        out.append(
            {
                "claim": text,
                "ours": f"{label.get(a, a)}: {mean_a:.2f} vs {label.get(b, b)}: {mean_b:.2f}",
                "Δ acc (pp)": f"{delta:+.2f} ± {se:.2f}"
                if n > 1
                else f"{delta:+.2f} (one seed: no error bar)",
                "params ratio": f"{ratio:.2f}",
                "seeds": ",".join(map(str, seeds)),
                "verdict": said,
            }
        )
    return out


CLAIM_COLUMNS = ("claim", "ours", "Δ acc (pp)", "params ratio", "seeds", "verdict")


def write_summary(
    folder: Path, setup: Setup, cells: Sequence[Cell], header: str, failed: Sequence[str] = ()
) -> None:
    """Rewrite table.md, table.csv, claims.md and the plot from runs.csv (atomic writes).

    ``failed`` names the runs of this invocation that failed (they are retried on resume).
    """
    rows = common.read_rows(folder / "runs.csv")
    summary = summarize(rows, cells)
    trows = table_rows(summary, len(setup.seeds))
    done = sum(s["n"] for s in summary)
    total = len(cells) * len(setup.seeds)
    settings = (
        f"model {setup.model or 'MiniLM (all-MiniLM-L6-v2)'}, data "
        f"{setup.data or 'Rotten Tomatoes snippets, film split'}, limit {setup.limit}, "
        f"{setup.epochs} epoch(s), max_steps {setup.max_steps}, batch {setup.batch_size}, "
        f"max length {setup.max_length}, lr {setup.lr}, probe steps {setup.probe_steps}, "
        f"seeds {list(setup.seeds)}, torch threads per run {setup.threads or 'default'}"
    )
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    dates = sorted(r["finished"] for r in rows if r.get("finished"))
    unlogged = sum(1 for r in rows if not r.get("machine"))
    measured = "Nothing measured yet." if not rows else (
        f"Measured on {' / '.join(machines) or 'an unrecorded machine'}"
        + (f"; runs finished {dates[0]} – {dates[-1]}" if dates else "")
        + (f" ({unlogged} run(s) written before machine and date were logged)" if unlogged else "")
        + "."
    )  # fmt: skip
    note = (
        f"Configuration `{setup.name}`: {settings}.\n\n{measured} {header}\n\n"
        f"Finished runs: {done} of {total} (cells × seeds)."
        + (f" Failed in the last invocation: {', '.join(failed)}." if failed else "")
        + "\n\n"
        "Trainable parameters exclude the classifier head, which every method trains "
        f"({summary[0]['head'] if summary else 0:,} parameters), and are counted as the plan "
        "counts them (FlexLoRA: its r active directions and λ, not the 2r capacity it "
        "allocates; peft methods: peft's count); a range means the plan differed by seed. "
        "`train s` is the training "
        "loop's mean time; `probe s` the gradient probe of the run that computed the "
        "statistics (later cells of the same seed reuse them); `peak MiB` is CUDA "
        "max_memory_allocated on a GPU, the run process's peak RSS on the CPU.\n\n"
    )
    atomic_write_text(folder / "table.md", note + common.markdown_table(trows, TABLE_COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(trows)
    atomic_write_text(folder / "table.csv", buf.getvalue())
    crows = claims_rows(rows, cells)
    atomic_write_text(
        folder / "claims.md",
        f"Configuration `{setup.name}`; {done} of {total} runs finished. Each claim compares its "
        "two cells on the seeds both finished (a seed fixes the data subset and split): `ours` "
        "gives their mean accuracies over those seeds, Δ the mean per-seed difference ± its "
        "standard error. A claim is `held` when Δ has the claimed sign and exceeds twice the "
        "standard error, `(within noise)` when it does not (always with one seed); `matches` "
        "holds when the candidate is at most max(0.5 pp, 2 SE) below.\n\n"
        + common.markdown_table(crows, CLAIM_COLUMNS),
    )
    if summary:
        try:
            from entrolora.report import plot_accuracy_vs_params

            runs = [
                {"method": s["cell"].label, "accuracy": s["acc_mean"] / 100,
                 "trainable_params": sum(s["params"]) / len(s["params"])}
                for s in summary
            ]  # fmt: skip
            plot_accuracy_vs_params(runs, folder / "accuracy_vs_params.png")
        except ImportError:  # matplotlib is optional
            pass


# -- the smoke configuration ------------------------------------------------------------------
def smoke_assets(root: Path) -> tuple[str, str]:
    """A tiny random BERT classifier with a word-level tokenizer, and a learnable CSV."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = [f"w{i}" for i in range(40)] + ["good", "great", "bad", "awful"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    model_dir = root / "tiny-bert"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(64):
        pos = i % 2 == 0
        text = [rng.choice(words[:40]) for _ in range(rng.randint(3, 8))]
        text.insert(rng.randint(0, len(text)), rng.choice(words[40:42] if pos else words[42:]))
        lines.append(f"{' '.join(text)},{'pos' if pos else 'neg'}")
    data = root / "tiny.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(model_dir), str(data)


# -- the grid ---------------------------------------------------------------------------------
def run_grid(
    setup: Setup, folder: Path, work: Path, header: str, progress: bool = True, jobs: int = 1
) -> list[dict]:
    """Run every unfinished (cell, seed) of ``setup``, seed-major, ``jobs`` runs at a time.

    A run that needs a seed's statistics waits while another run of that seed computes them.
    Returns runs.csv's rows; RuntimeError listing the runs that failed (the others finish).
    """
    import torch

    cells = [c for c in CELLS if c.key in setup.cells]
    folder.mkdir(parents=True, exist_ok=True)
    done = {(r["cell"], int(r["seed"])) for r in common.read_rows(folder / "runs.csv")}
    # Seed-major: a partial grid has every method at seed 0 before any at seed 1.
    run_seeds = setup.only_seeds if setup.only_seeds is not None else setup.seeds
    todo = [(c, s) for s in run_seeds for c in cells if (c.key, s) not in done]
    write_summary(folder, setup, cells, header)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells) * len(setup.seeds), initial=len(done), unit="run")
    say = bar.write if bar is not None else (lambda m: print(m, flush=True))
    stats_file = {
        s: str(work / f"stats-seed{s}.safetensors")
        for s in setup.seeds
        if (work / f"stats-seed{s}.safetensors").is_file()
    }
    probing: set[int] = set()  # seeds whose statistics a run is computing now
    failed: list[str] = []
    lock = threading.Condition()

    def take() -> tuple[Cell, int, str | None] | None:
        """The next run that can start (with its statistics file), or None when none is left."""
        with lock:
            while todo:
                # Another runner of the same grid (e.g. another --seeds) may have finished some.
                rows = common.read_rows(folder / "runs.csv")
                finished = {(r["cell"], int(r["seed"])) for r in rows}
                todo[:] = [(c, s) for c, s in todo if (c.key, s) not in finished]
                for i, (cell, seed) in enumerate(todo):
                    needs = cell.method not in PROBE_FREE
                    if needs and seed not in stats_file:
                        if seed in probing:
                            continue
                        probing.add(seed)  # this run probes; the seed's others wait for it
                    del todo[i]
                    return cell, seed, stats_file.get(seed) if needs else None
                lock.wait()
            return None

    def finish(cell: Cell, seed: int, shared: str | None, row: dict | None) -> None:
        with lock:
            if probes(cell, shared):
                probing.discard(seed)
                if row is not None:
                    # Keep the statistics outside the run folder, which a rerun replaces.
                    dst = work / f"stats-seed{seed}.safetensors"
                    shutil.copyfile(work / f"{cell.key}-seed{seed}" / "stats.safetensors", dst)
                    stats_file[seed] = str(dst)
            if row is None:
                failed.append(f"{cell.key} seed {seed}")
            else:
                info = common.machine_info(torch.device(row.get("device") or "cpu"))
                info["torch_threads"] = str(setup.threads or torch.get_num_threads())
                row = {**row, "config": setup.name, "finished": info.pop("date")}
                row["machine"] = common.describe({**info, "date": ""}).rstrip("; ")
                common.append_row(folder / "runs.csv", row, RUN_FIELDS)
                say(
                    f"{cell.label} seed {seed}: accuracy {100 * float(row['accuracy']):.2f}%, "
                    f"{int(row['trainable_params']):,} params, train {float(row['train_s']):.1f} s"
                )
            write_summary(folder, setup, cells, header, failed)
            if bar is not None:
                bar.update(1)
            lock.notify_all()

    def runner() -> None:
        while (task := take()) is not None:
            cell, seed, shared = task
            try:
                row = run_cell(setup, cell, seed, work, shared)
            except RuntimeError as e:  # one broken method must not stop the grid
                say(str(e))
                row = None
            finish(cell, seed, shared, row)

    if jobs == 1:
        runner()
    else:
        with ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(runner) for _ in range(jobs)]:
                f.result()
    if bar is not None:
        bar.close()
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (rerun to retry): {', '.join(failed)}")
    return common.read_rows(folder / "runs.csv")


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse arguments, run (the rest of) the grid, print the table; returns the results folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--model", default=None, help="smollm2, or a local model folder")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 1 seed, few steps")
    ap.add_argument("--results", default=str(RESULTS), help="folder for <config>/ outputs")
    ap.add_argument("--work", default=None, help="folder for run folders (default runs/…)")
    ap.add_argument("--cells", default=None, help="comma-separated cell keys (default: all)")
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds to run now (default: the config's); several runners with "
        "disjoint --seeds can share one grid",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    ap.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each its own process (default 1)"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="rewrite the tables from runs.csv, train nothing",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.threads)
        return Path(".")
    keys = {c.key for c in CELLS}
    tmp = None
    if args.smoke:  # the model and data are filled in below, once the arguments are valid
        setup = Setup("smoke", None, None, (0,), epochs=1, limit=None, max_length=16,
                      batch_size=8, probe_steps=2, max_steps=2, cells=SMOKE_CELLS,
                      isolate=False)  # fmt: skip
    else:
        setup = CONFIGS[args.config]
        if args.model:
            name = Path(args.model).name if args.model != "smollm2" else "smollm2"
            setup = Setup(**{**asdict(setup), "name": f"{setup.name}-{name}", "model": args.model})
    if args.cells:
        chosen = tuple(k.strip() for k in args.cells.split(",") if k.strip())
        unknown = sorted(set(chosen) - keys)
        if unknown:
            raise ValueError(f"unknown cell(s) {unknown}; choose from {', '.join(sorted(keys))}")
        setup = Setup(**{**asdict(setup), "cells": chosen})
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        setup = Setup(**{**asdict(setup), "threads": args.threads})
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1:  # in-process runs would share torch's global RNG and thread pool
        setup = Setup(**{**asdict(setup), "isolate": True})
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        if args.smoke or not set(seeds) <= set(setup.seeds):
            # Seeds outside the configuration's make a different grid: count them in the tables.
            setup = Setup(**{**asdict(setup), "seeds": seeds})
        else:
            setup = Setup(**{**asdict(setup), "only_seeds": seeds})
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="entrolora-bench-smoke-"))
        model, data = smoke_assets(tmp)
        setup = Setup(**{**asdict(setup), "model": model, "data": data})
    folder = Path(args.results) / setup.name
    work = Path(args.work) if args.work else (tmp or WORK) / setup.name
    cmd = "python bench/quality.py " + (
        "--smoke"
        if args.smoke
        else f"--config {args.config}" + (f" --model {args.model}" if args.model else "")
    )
    cmd += f" --threads {args.threads}" if args.threads else ""
    cmd += f" --jobs {args.jobs}" if args.jobs > 1 else ""
    cmd += f" --cells {args.cells}" if args.cells else ""
    shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    header = f"Regenerate: `{cmd}` (resumes; delete `{shown}/runs.csv` to start over)."
    try:
        if args.summary_only:
            write_summary(folder, setup, [c for c in CELLS if c.key in setup.cells], header)
        else:
            run_grid(setup, folder, work, header, progress=not args.quiet, jobs=args.jobs)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print((folder / "table.md").read_text(encoding="utf-8"))
    print((folder / "claims.md").read_text(encoding="utf-8"))
    return folder


if __name__ == "__main__":
    main()
