"""One run of ``bench/quality/quality.py``: its ``TrainConfig``, the validation split, the
subprocess entry (``worker``) and the smoke configuration's tiny assets. ``setup`` and ``cell``
arguments are ``quality.Setup`` and ``quality.Cell``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROBE_FREE = ("lora", "sharelora", "flexlora", "peft-lora", "dora", "adalora", "vera", "lora-plus",
              "eva", "lora-ga", "pissa", "truncate")  # fmt: skip


def adalora_schedule(total: int) -> dict[str, int]:
    """peft AdaLoRA's budget schedule for ``total`` steps, in the proportions of the AdaLoRA
    authors' GLUE scripts (DeBERTaV3 SST-2: 6,000 initial and 22,000 final of ≈ 50,500 steps,
    a reallocation every 100): tinit 12 %, tfinal 44 %, deltaT total/500 (at least 1)."""
    return {
        "tinit": round(0.12 * total),
        "tfinal": round(0.44 * total),
        "deltaT": max(1, total // 500),
    }


def cell_options(setup: Any, cell: Any) -> dict[str, Any]:
    """The cell's options, with peft AdaLoRA's schedule sized to the setup's steps."""
    opts = dict(cell.options)
    if cell.method == "adalora" and setup.max_steps and "tinit" not in opts:
        opts.update(adalora_schedule(setup.max_steps))
    return opts


def train_config(
    setup: Any, cell: Any, seed: int, lr: float, output: Path, stats: str | None
) -> dict:
    """The ``TrainConfig`` fields of one run, as a JSON-able dict."""
    return {
        "model": setup.model,
        "data": setup.data,
        "method": cell.method,
        "r": cell.r,
        "options": cell_options(setup, cell),
        "target_modules": [cell.targets] if cell.targets else None,
        "probe_steps": setup.probe_steps,
        "stats": stats,
        "keep_gradients": probes(cell, stats),  # for the later cells' cosine/L1/L2 similarity
        "epochs": setup.epochs,
        "max_steps": setup.max_steps,
        "lr": lr,
        "batch_size": setup.batch_size,
        "max_length": setup.max_length,
        "limit": setup.limit,
        "seed": seed,
        "output": str(output),
        "overwrite": True,
        "progress": False,
        "report": False,
    }


@contextlib.contextmanager
def held_out(validation: float | None) -> Iterator[list[dict]]:
    """Make ``train_run``'s train/test split give (train − validation, validation) instead.

    ``validation`` is the slice's share of the training split (None: the split is unchanged);
    the slice is cut by film, like the test split, with the same seed. Yields one record per
    split made (rows fitted, rows held out, majority share of the held-out labels), which the
    caller checks against the run's metrics, so that a ``train_run`` that stopped splitting
    through ``entrolora.data.split`` fails loudly instead of evaluating on the test split.
    """
    from entrolora.data import datasets as D

    original = D.split
    seen: list[dict] = []

    def split(ds: Any, test_fraction: float = 0.2, seed: int = 0) -> tuple[Any, Any]:
        train, test = original(ds, test_fraction, seed)
        if validation is not None:  # the test split is dropped unread
            train, test = original(train, validation, seed)
        labels = test.labels or []
        majority = max(labels.count(v) for v in set(labels)) / len(labels) if labels else None
        seen.append({"fit": len(train), "held_out": len(test), "majority": majority})
        return train, test

    D.split = split
    try:
        yield seen
    finally:
        D.split = original


MATCHED = ("e2lora",)  # planners whose count is not r·(d_in + d_out): their r is matched


def matched_rank(stats_path: str, method: str, options: dict, budget_r: int) -> int:
    """The rank whose plan from these statistics holds the parameter count nearest to uniform
    LoRA at ``budget_r`` on the same modules (ties: the smaller rank); searched over 1…4·r."""
    from entrolora.job.config import planner_name
    from entrolora.planners import plan as plan_by_name
    from entrolora.stats import GradientStats

    stats = GradientStats.load(stats_path)
    target = budget_r * sum(stats[n].d_in + stats[n].d_out for n in stats)

    def gap(r: int) -> tuple[int, int]:
        plan = plan_by_name(planner_name(method), stats, **{**options, "r": r})
        return abs(plan.num_trainable_params() - target), r

    return min(range(1, 4 * budget_r + 1), key=gap)


def worker(payload_json: str, threads: int | None = None) -> None:
    """Subprocess entry: train one run; its metrics land in the run folder's metrics.json and
    the split it evaluated on in bench.json."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from entrolora.train import TrainConfig, train_run

    payload = json.loads(payload_json)
    if "truncate" in payload:  # the truncation control: no training, the source run cut
        _truncate(payload["truncate"])
        return
    match = payload.get("match")
    if match and payload["config"]["stats"]:  # the seed's statistics exist: match the count
        c = payload["config"]
        c["r"] = matched_rank(c["stats"], c["method"], c["options"], int(match))
    if payload["config"].get("task") == "sft":
        _sft(payload["config"])
        return
    # A run that finished but was never recorded (its runner was killed) is run again; its old
    # bench.json is ours, not the job's, and would make the job refuse to replace the folder.
    (Path(payload["config"]["output"]) / "bench.json").unlink(missing_ok=True)
    with held_out(payload["validation"]) as seen:
        result = train_run(TrainConfig(**payload["config"]))
    if len(seen) != 1 or result.metrics.get("test_examples") != seen[0]["held_out"]:
        raise RuntimeError(
            "train_run did not evaluate on the split bench/quality/quality.py gave it (it no "
            "longer splits through entrolora.data.split); update held_out() in "
            "bench/quality/quality.py"
        )
    (result.output / "bench.json").write_text(json.dumps(seen[0]) + "\n", encoding="utf-8")


def _truncate(job: dict) -> None:
    """Evaluate the source run cut to the budget (``truncation.evaluate_truncated``) on the
    split the source run was scored on; bench.json as a trained run's."""
    from truncation import evaluate_truncated

    out = Path(job["output"])
    with held_out(None) as seen:
        m = evaluate_truncated(Path(job["source"]), int(job["r"]), out)
    if m["config"].get("task") == "sft":  # the math set's own split: nothing was patched
        seen = [{"fit": None, "held_out": m["test_examples"], "majority": None}]
    elif len(seen) != 1 or m.get("eval_examples") != seen[0]["held_out"]:
        raise RuntimeError("the truncation control did not evaluate on the source run's split")
    (out / "bench.json").write_text(json.dumps(seen[0]) + "\n", encoding="utf-8")


def _sft(config: dict) -> None:
    """A ``--task sft`` run: the math set's own validation or test split is held out (the
    ``eval_split`` of its options), so no split is patched."""
    from entrolora.data.sft import SFTOptions
    from entrolora.train import TrainConfig, train_run

    (Path(config["output"]) / "bench.json").unlink(missing_ok=True)
    result = train_run(TrainConfig(**{**config, "sft": SFTOptions(**config["sft"])}))
    m = result.metrics
    split = {"fit": m["train_examples"], "held_out": m["test_examples"], "majority": None}
    (result.output / "bench.json").write_text(json.dumps(split) + "\n", encoding="utf-8")


def flex_ranks_moved(folder: Path, r0: int) -> str:
    """``"moved/modules"``: FlexLoRA modules whose last recorded rank is not ``r0`` ("" if none)."""
    path = folder / "flex_history.json"
    if not path.is_file():
        return ""
    history = json.loads(path.read_text(encoding="utf-8"))
    if not history:
        return ""
    ranks = history[-1][1]
    return f"{sum(int(v) != r0 for v in ranks.values())}/{len(ranks)}"


def probes(cell: Any, stats: str | None) -> bool:
    """Whether the run of ``cell`` given ``stats`` computes its seed's statistics itself."""
    return stats is None and cell.method not in PROBE_FREE


# -- the smoke configuration ------------------------------------------------------------------
def smoke_assets(root: Path, task: str = "classify") -> tuple[str, str | None]:
    """A tiny random BERT classifier with a word-level tokenizer, and a learnable CSV; for
    ``task`` sft a tiny random Llama with SmolLM2's tokenizer, on the shipped math set."""
    if task == "sft":
        return smoke_sft_model(root), None
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


def smoke_sft_model(root: Path) -> str:
    """A tiny random Llama (2 layers, hidden 32) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from entrolora.job.models import load_model

    _, tokenizer, _ = load_model("smollm2", "causal-lm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    path = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
