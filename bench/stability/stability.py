"""Plan stability: do disjoint calibration subsets give the same plan? (issue 14)

    python bench/stability/stability.py                 # MiniLM, 4 disjoint subsets, S = 16, 32, 64
    python bench/stability/stability.py --model smollm2      # SmolLM2-135M (the job's GGUF loader)
    python bench/stability/stability.py --seeds paired,fixed --head-fit 0,64
    python bench/stability/stability.py --probe-head centroid,model
    python bench/stability/stability.py --smoke              # tiny random BERT, seconds (CI)
    python bench/stability/stability.py --model smollm2 --jobs 2   # two passes at a time
    python bench/stability/stability.py --whole --steps 64 --stats-dir DIR --out STEM  # issue 33

The training split (the job's film split, seed 0) is shuffled once (batch 32, length 64: the
job's defaults) and cut into K disjoint runs of max(S) batches. Each run is probed with
``el.probe`` in blocks of ``--block`` batches on a model loaded after seeding with its seed:
``--seeds paired`` gives subset k the seed k (its own classifier-head init, as different
``--seed``s give), ``fixed`` seed 0 for all. ``--probe-head centroid`` (the job's default)
probes through the centroid head of the subset's max(S) batches (``job.centroid_head``: the
output layer along the centred class means of its input), ``pool`` through the centroid head of
all K subsets' batches (one head for every subset: the head's own sampling noise taken out),
``model`` through the seeded head as loaded. With ``--head-fit N`` the classifier head alone is
first fitted for N AdamW steps on the subset's own batches (linear probing before the probe).
The first S batches of a run give the statistics of a probe of size S: ``G`` is their mean,
exactly the probe's, and the noise estimate comes from alternate blocks instead of alternate
batches (``GradientStats.from_halves``; the same covariance for any split fixed before the data
is seen), so one pass measures every S. From each, E²LoRA and RaLoRA plans (r = 8, defaults)
with ``statistics="raw"`` and ``"signal"``. Reported over the K subsets: the share of module
types whose E²LoRA intervals are identical in all K, of types whose E²LoRA ranks are, and of
modules whose RaLoRA block count is, of types whose ranks differ by at most one unit (``ranks
±1``), the median one-probe sd of HRA's real shares (``rank_noise.py``), and the median gradient
SNR. Each record also keeps the RMI matrices the greedy partition read, per reading and type,
for ``bench/stability/partition_noise.py``, and the real shares for ``rank_noise.py --records``.
``--whole --stats-dir DIR`` saves each pass's statistics in DIR and plans from the file, so a new
``--out`` replans saved probes in seconds (``z_sweep.py`` reads the same folder).

Each pass appends its plans to ``<out>.jsonl`` when it ends and a rerun skips the passes already
there (a long SmolLM2 run resumes); ``--jobs N`` runs N passes at a time in their own processes.
The table goes to ``<out>.txt``; ``--table-only`` rewrites it from the passes already in
``<out>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from signal_bias import edge_erank  # noqa: E402
from stability_table import READINGS, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# the new default partition (boundaries="significant", issue 33) against the paper's greedy chain
GATES = ("significant", "greedy")


@dataclass(frozen=True)
class Probe:
    """One probe pass of the benchmark: which data, which head; ``steps`` is its largest S."""

    model: str
    steps: int
    subset: int
    seed: int
    head_fit: int
    batch_size: int
    max_length: int
    block: int
    probe_head: str = "model"  # records written before the option have the loaded head
    whole: bool = False  # one el.probe of all the subset's batches, its defaults (issue 33)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# -- data and model -------------------------------------------------------------------------------
def real_setup(model: str | None, batch_size: int, max_length: int):
    """``(load(seed) -> model, all shuffled training batches)`` as the job builds them."""
    from entrolora.data import datasets as D
    from entrolora.job import load_model, seed_everything

    ds = D.load_data(None, "text", "label", "classify")
    train, _ = D.split(ds, 0.2, 0)

    def fresh(seed: int) -> tuple[torch.nn.Module, Any]:
        seed_everything(seed)  # the classifier head's init, as `--seed seed` gives
        net, tokenizer, _ = load_model(model, "classify", 2, train.label_names)
        return net.eval(), tokenizer

    first, tokenizer = fresh(0)  # the tokenizer comes with a model: keep it for seed 0
    cache = {0: first}
    batches = list(
        D.iter_batches(tokenizer, train, batch_size, max_length, "classify", True, seed=12345)
    )

    def load(seed: int) -> torch.nn.Module:
        return cache.pop(seed) if seed in cache else fresh(seed)[0]

    return load, batches


def smoke_setup(batch_size: int, max_length: int):
    """A tiny random BERT classifier and random labelled batches (CI)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    shift = torch.randint(1, 64, (64,), generator=g)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 64, (batch_size, max_length), generator=g)
        labels = (shift[ids[:, 0]] > 32).long()  # learnable: the label follows the first token
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    batches = [batch() for _ in range(256)]

    def load(seed: int) -> torch.nn.Module:
        torch.manual_seed(1000)  # one body for every seed ...
        model = BertForSequenceClassification(cfg).eval()
        torch.manual_seed(seed)  # ... and a head drawn from the seed
        model.classifier.reset_parameters()
        return model

    return load, batches


def fit_head(model: torch.nn.Module, batches: Sequence[dict], steps: int, lr: float) -> None:
    """``steps`` AdamW steps on the classifier head alone over ``batches`` (cycled)."""
    from entrolora.job import head_modules

    params = [p for h in head_modules(model).values() for p in h.parameters()]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    for i in range(steps):
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p, req in saved:
        p.requires_grad_(req)


# -- one probe ---------------------------------------------------------------------------------
def plans_of(stats: Any) -> dict[str, Any]:
    """Both readings' E²LoRA intervals and ranks per type, RaLoRA blocks per module, SNRs."""
    from rank_noise import share_cov

    import entrolora as el
    from entrolora.stats.margin_noise import margin_sd

    out: dict[str, Any] = {"snr": {n: m.snr for n, m in stats.modules.items()}}
    for reading, gate in [(r, "significant") for r in READINGS] + [("signal", "greedy")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 1-batch smoke probe has no noise estimate
            e2 = el.plan_e2lora(stats, r=8, statistics=reading, boundaries=gate)
            ra = el.plan_ralora(stats, r=8, statistics=reading)
        types = e2.options["types"]
        used = e2.options["statistics"]
        key = reading if gate == "significant" else "greedy"
        out[key] = {
            "used": used,
            # "greedy": the ungated chain (asked for, or no moment noise to gate with)
            "boundaries": e2.options["boundaries"],
            "undecided": {t: d.get("undecided") for t, d in types.items()},
            "decide_steps": {t: d.get("decide_steps") for t, d in types.items()},
            "intervals": {t: d["intervals"] for t, d in types.items()},
            "ranks": {t: d["ranks"] for t, d in types.items()},
            # HRA's real shares x_k = F_k·R' before rounding (rank_noise.py --records)
            "shares": {t: _shares(d) for t, d in types.items()},
            "blocks": {n: m.blocks for n, m in ra.modules.items()},
            # the partition's input, for stability/partition_noise.py (E²LoRA's default similarity)
            "similarity": {
                t: [
                    [round(v, 7) for v in row]
                    for row in stats.similarity(t, statistics=e2.options["statistics"]).tolist()
                ]
                for t in stats.types
            },
            "degenerate": {
                t: [stats.modules[n].entropy_of(e2.options["statistics"]) is None for n in names]
                for t, names in stats.types.items()
            },
        }
        if key in READINGS and stats.moment_cov:  # one-probe sd of every margin [s][c]
            out[key]["margin_sd"] = {
                t: [[float(f"{v:.4g}") for v in row] for row in sd.tolist()]
                for t in stats.types
                if (sd := margin_sd(stats, t, statistics=e2.options["statistics"])) is not None
            }
            out[key]["share_sd"] = {  # and of HRA's real shares x_k = F_k·R (rank_noise.py)
                t: [float(f"{math.sqrt(max(c[k][k], 0.0)):.4g}") for k in range(len(c))]
                for t, d in types.items()
                if (c := share_cov(stats, t, d["intervals"], d["budget"], e2.options["statistics"]))
                is not None
            }
    if stats.noise:
        out["edge"] = {"used": "edge", "blocks": edge_blocks(stats)}
    return out


def _shares(diag: dict) -> list[float | None]:
    """HRA's real shares ``x_k = F_k·R'`` of one type's plan diagnostics (None: degenerate)."""
    w = diag["weights"]
    live = [v for v in w if v is not None]
    budget = diag["budget"] - (len(w) - len(live))
    return [None if v is None else round(budget * v / math.fsum(live), 4) for v in w]


def edge_blocks(stats: Any) -> dict[str, int]:
    """RaLoRA block counts (r = 8) from the mirrored-noise-edge effective rank (signal_bias.py's
    ``edge_erank``, not METHODS.md §2's clip at 0): what that proposal would do to stability.
    E²LoRA does not read the effective rank, so only RaLoRA has an edge reading."""
    import entrolora as el

    modules = {}
    for name, m in stats.modules.items():
        edge = None
        if m.signal_erank is not None:
            edge = edge_erank(stats.gradients[name].double(), stats.noise[name].double())
        modules[name] = replace(m, signal_erank=None if edge is None or math.isnan(edge) else edge)
    plan = el.plan_ralora(replace(stats, modules=modules), r=8, statistics="signal")
    return {n: m.blocks for n, m in plan.modules.items()}


def block_means(probe: Probe, load, batches: Sequence[dict], targets: Any, args) -> list:
    """The subset's mean gradient per block of ``probe.block`` batches (``el.probe`` each)."""
    import entrolora as el

    start = probe.subset * probe.steps
    chunk = batches[start : start + probe.steps]
    from entrolora.job import centroid_head, default_targets

    model = load(probe.seed)
    if probe.head_fit:
        fit_head(model, chunk, probe.head_fit, args.head_fit_lr)
    if targets is None:
        targets = default_targets(model)
    if probe.whole:  # the public API with its defaults; the head as --probe-head says

        def whole(head: str) -> list:
            return [el.probe(model, chunk, targets, steps=len(chunk), progress=False, head=head)]

        if probe.probe_head == "pool":  # one centroid of all K subsets' batches (bench only)
            with centroid_head(model, batches[: args.subsets * probe.steps]):
                return whole("model")
        return whole("model" if probe.probe_head == "model" else "centroid")
    out = []
    # "pool": the centroid of all K subsets' batches, one head for every subset (bench only)
    pool = batches[: args.subsets * probe.steps]
    head = {"centroid": chunk, "pool": pool}.get(probe.probe_head)
    with centroid_head(model, head) if head is not None else nullcontext():
        for i in range(0, probe.steps, probe.block):
            part = chunk[i : i + probe.block]
            stats = el.probe(model, part, targets, steps=len(part), progress=False, head="model")
            out.append(stats.gradients)
    return out


def stats_of(blocks: Sequence[dict]) -> Any:
    """Statistics of the batches of ``blocks``: G their mean, D from alternate blocks."""
    from entrolora.stats import GradientStats

    halves = [blocks[0::2], blocks[1::2]]
    means = [{n: sum(b[n] for b in h) / len(h) for n in blocks[0]} for h in halves]
    return GradientStats.from_halves(*means, counts=(len(halves[0]), len(halves[1])))


def run_pass(probe: Probe, sizes: Sequence[int], load, batches, targets, args) -> list[dict]:
    """One record per probe size S (a multiple of two blocks) from one pass over the subset."""
    saved = None
    if args.stats_dir and probe.whole:  # one statistics file per pass: plans redone from it
        tag = f"S{probe.steps}-subset{probe.subset}-seed{probe.seed}-{probe.probe_head}"
        saved = Path(args.stats_dir) / f"{tag}-fit{probe.head_fit}.safetensors"
    if saved is None or not saved.is_file():
        t0 = time.perf_counter()
        blocks = block_means(probe, load, batches, targets, args)
        seconds = time.perf_counter() - t0
        if saved is not None:
            # statistics only (KBs, committable), so the plans come from the file either way;
            # without the gradients there is no "edge" reading
            blocks[0].meta["probe_seconds"] = seconds
            blocks[0].save(saved)
    if saved is not None:
        from entrolora.stats import GradientStats

        blocks = [GradientStats.load(saved)]
        seconds = blocks[0].meta["probe_seconds"]
    records = []
    for size in sizes:
        stats = blocks[0] if probe.whole else stats_of(blocks[: size // probe.block])
        records.append({"probe": asdict(probe), "size": size, "seconds": seconds,
                        **plans_of(stats)})  # fmt: skip
    return records


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="smollm2 or a model folder (default MiniLM)")
    p.add_argument("--steps", default="16,32,64", help="probe sizes S, multiples of 2·block")
    p.add_argument("--subsets", type=int, default=4, help="disjoint calibration subsets K")
    p.add_argument("--seeds", default="paired", help="paired (subset k: seed k) and/or fixed")
    p.add_argument("--probe-head", default="centroid", help="centroid, pool, model; comma-sep.")
    p.add_argument("--head-fit", default="0", help="head-only steps before probing, comma-sep.")
    p.add_argument("--head-fit-lr", type=float, default=1e-2)
    p.add_argument("--block", type=int, default=8, help="batches per probe block")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--target-modules", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="passes run in parallel processes")
    p.add_argument("--out", default=None, help="results stem (bench/results/stability/<model>)")
    p.add_argument(
        "--whole",
        action="store_true",
        help="one el.probe per subset of max(--steps) batches with the library's "
        "defaults (the head: centroid unless --probe-head model); one S only",
    )
    p.add_argument(
        "--stats-dir",
        default=None,
        help="with --whole: save each pass's statistics (no gradients) here and plan from the "
        "file; a pass whose file is there is not probed again (a new --out replans them)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny random BERT, 2 subsets, S = 4")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite the table from <out>.jsonl, probe nothing (passes not there "
                   "are left out; K says how many subsets a row has)")  # fmt: skip
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.subsets, args.block, args.batch_size, args.max_length = "4", 2, 2, 4, 8
        args.head_fit, args.probe_head = "0,4", "centroid,model"
    args.sizes = sorted({int(v) for v in args.steps.split(",")})
    if args.whole:
        args.sizes = args.sizes[-1:]
        args.block = args.sizes[0] // 2
    bad = [v for v in args.sizes if v < 2 * args.block or v % (2 * args.block)]
    if bad:
        raise SystemExit(f"--steps must be multiples of 2·--block = {2 * args.block}; got {bad}")
    return args


def passes(args: argparse.Namespace, label: str, available: int) -> list[tuple[Probe, str]]:
    """Every (pass, seeds mode) to run: subsets × seed modes × probe heads × head-fit steps."""
    top = args.sizes[-1]
    if args.subsets * top > available:
        raise SystemExit(
            f"{args.subsets} disjoint subsets of {top} batches need {args.subsets * top} batches; "
            f"the training split has {available}: lower --subsets or --steps"
        )
    from entrolora.job import PROBE_HEADS

    out = []
    for seeds in args.seeds.split(","):
        if seeds not in ("paired", "fixed"):
            raise SystemExit(f"--seeds takes paired and/or fixed, got {seeds!r}")
        for probe_head in args.probe_head.split(","):
            if probe_head not in (*PROBE_HEADS, "pool"):
                raise SystemExit(f"--probe-head takes {', '.join(PROBE_HEADS)} and/or pool, got "
                                 f"{probe_head!r}")  # fmt: skip
            for head_fit in (int(h) for h in args.head_fit.split(",")):
                for k in range(args.subsets):
                    seed = k if seeds == "paired" else 0
                    probe = Probe(label, top, k, seed, head_fit, args.batch_size,
                                  args.max_length, args.block, probe_head, args.whole)  # fmt: skip
                    out.append((probe, seeds))
    return out


def setup(args: argparse.Namespace) -> tuple[Any, list[dict], Any]:
    """``(load, batches, targets)`` of the model ``args`` names."""
    if args.smoke:
        return (*smoke_setup(args.batch_size, args.max_length), ["query", "value"])
    load, batches = real_setup(args.model, args.batch_size, args.max_length)
    return load, batches, args.target_modules.split(",") if args.target_modules else None


_WORKER: dict[str, Any] = {}  # a worker process's own setup, made on its first pass


def worker_pass(probe: Probe, args: argparse.Namespace) -> list[dict]:
    """``run_pass`` in a ``--jobs`` worker process."""
    if not _WORKER:
        torch.set_num_threads(args.threads)
        _WORKER["setup"] = setup(args)
    load, batches, targets = _WORKER["setup"]
    return run_pass(probe, args.sizes, load, batches, targets, args)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    label = "smoke" if args.smoke else Path(args.model).name if args.model else "minilm"
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / "stability" / label
    stem.parent.mkdir(parents=True, exist_ok=True)
    load, batches, targets = setup(args)
    jsonl = stem.with_suffix(".jsonl")
    done: dict[str, list[dict]] = {}  # pass key → its records (one per size)
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            rec = json.loads(line)
            done.setdefault(Probe(**rec["probe"]).key, []).append(rec)
    todo = list(passes(args, label, len(batches)))
    if not args.table_only:
        missing = [
            p for p, _ in todo if not set(args.sizes) <= {r["size"] for r in done.get(p.key, [])}
        ]
        missing = list(dict.fromkeys(missing))  # a pass serves both seed modes where they coincide

        def finished(probe: Probe, new: list[dict]) -> None:
            print(f"probed subset {probe.subset} seed {probe.seed} head {probe.probe_head} "
                  f"head-fit {probe.head_fit}: {new[0]['seconds']:.0f} s", flush=True)  # fmt: skip
            with jsonl.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            done.setdefault(probe.key, []).extend(new)

        if args.jobs > 1 and len(missing) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
                futures = {pool.submit(worker_pass, p, args): p for p in missing}
                for future in as_completed(futures):
                    finished(futures[future], future.result())
        else:
            for probe in missing:
                finished(probe, run_pass(probe, args.sizes, load, batches, targets, args))
    records = []
    for probe, seeds in todo:
        have = {r["size"]: r for r in done.get(probe.key, [])}
        records.extend({**have[size], "seeds": seeds} for size in args.sizes if size in have)
    text = table(records, args, argv)
    stem.with_suffix(".txt").write_text(text + "\n")
    print(text)
    return {"records": records, "text": text, "stem": stem}


if __name__ == "__main__":
    main()
