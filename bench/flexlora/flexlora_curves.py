"""FlexLoRA's training loss beside LoRA's and peft AdaLoRA's on the demo task, and its ranks.

    python bench/flexlora/flexlora_curves.py            # `entrolora demo`'s data and budget, seed 0
    python bench/flexlora/flexlora_curves.py --reuse runs/demo # LoRA, FlexLoRA of `entrolora demo`
    python bench/flexlora/flexlora_curves.py --smoke    # tiny random BERT and CSV, a few steps (CI)

Each method is one ``train_run`` with the demo's settings (MiniLM, 2,400 Rotten Tomatoes
training snippets, scored on the whole held-out split of the film split, 1 epoch, batch 32,
lr 2e-3, same seed), so the curves differ only by the adapter. The per-step losses are
``RunResult.losses`` (the run folder's ``train_loss.json``): the task loss for LoRA and FlexLoRA,
task loss plus its orthogonality term for peft AdaLoRA (peft adds it inside the forward).
Writes ``<out>/flexlora_curves.png`` (losses, and FlexLoRA's rank evolution beside them) and
``<out>/flexlora_curves.json`` (losses, accuracies, the rank history and the settings).
``--reuse DIR`` reads the runs a default ``entrolora demo --output DIR`` already made (same
settings: ``DIR/<method>/train_loss.json``, ``metrics.json``, ``flex_history.json``) instead of
training them again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "LoRA r=8": "lora",
    "FlexLoRA r=8 (capacity 2r)": "flexlora",
    # peft adds AdaLoRA's orthogonality term (0.5 × mean of norms) to the loss inside forward
    "peft AdaLoRA 12→8 (loss incl. its orth. term)": "adalora",
}


def base_config(args: argparse.Namespace, work: Path):
    """The demo's TrainConfig (``entrolora demo`` defaults), or the smoke one."""
    from entrolora.job import TrainConfig

    cfg = TrainConfig(
        limit=args.limit, full_test=True, epochs=1, batch_size=32, max_length=64, lr=args.lr,
        seed=args.seed, probe_steps=32, progress=False, report=False, output=str(work / "run"),
    )  # fmt: skip
    if args.smoke:
        from quality import smoke_assets

        model, data = smoke_assets(work)
        cfg.model, cfg.data, cfg.limit, cfg.max_length, cfg.batch_size = model, data, None, 16, 8
        cfg.lr = 1e-2
    return cfg


def reused(folder: str, method: str) -> dict | None:
    """A finished run of ``method`` in a demo folder, or None when there is none."""
    run = Path(folder) / method
    if not (run / "train_loss.json").is_file() or not (run / "metrics.json").is_file():
        return None
    hist = run / "flex_history.json"
    return {
        "method": method,
        "accuracy": json.loads((run / "metrics.json").read_text())["accuracy"],
        "losses": json.loads((run / "train_loss.json").read_text()),
        "history": json.loads(hist.read_text()) if hist.is_file() else None,
        "reused": str(run),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model and data (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=3000, help="snippets (the demo's 3,000)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--output", default=str(ROOT / "docs" / "flexlora"), help="PNG/JSON folder")
    ap.add_argument("--reuse", default=None, help="a demo folder whose runs to read, not train")
    args = ap.parse_args(argv)
    import torch

    from entrolora.flex.plot import plot_loss_curves
    from entrolora.job import train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="flexlora-curves-") as tmp:
        base = base_config(args, Path(tmp))
        runs = {}
        for label, method in METHODS.items():
            runs[label] = reused(args.reuse, method) if args.reuse else None
            if runs[label] is None:
                cfg = type(base)(**{**asdict(base), "method": method, "output": f"{tmp}/{method}"})
                res = train_run(cfg)
                runs[label] = {
                    "method": method,
                    "accuracy": res.metrics.get("accuracy"),
                    "losses": list(res.losses),
                    "history": [[s, r] for s, r in res.history] if res.history else None,
                }
            acc, losses = 100 * runs[label]["accuracy"], runs[label]["losses"]
            print(f"{label:<28} accuracy {acc:.2f} %  ({len(losses)} steps)")
    flex = runs["FlexLoRA r=8 (capacity 2r)"]
    result = {"config": {**asdict(base), "output": None}, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "flexlora_curves.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    title = f"{'smoke' if args.smoke else 'demo task (MiniLM)'}, seed {args.seed}: training loss"
    plot_loss_curves(
        {k: v["losses"] for k, v in runs.items()},
        out / "flexlora_curves.png",
        history=flex["history"] or None,
        title=title,
    )
    print(f"wrote {out / 'flexlora_curves.png'} and {out / 'flexlora_curves.json'}")
    return result


if __name__ == "__main__":
    main()
