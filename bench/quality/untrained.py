"""The untrained model's scores on an sft grid's splits: the frontier's rank-0 point.

``python bench/quality/untrained.py --config math-cpu`` loads the configuration's model with no
adapter, scores the math set's validation and test splits as every run of the grid is scored
(teacher-forced exact match and answer loss, ``entrolora.job.sft.evaluate_sft``), prints one
line per split and writes them to ``bench/results/<config>/untrained.txt``. A grid's runs read
against it: what the training steps of any adapter add.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from quality_cells import CONFIGS  # noqa: E402

import common  # noqa: E402
from entrolora.data import sft as S  # noqa: E402
from entrolora.data.sft import SFTOptions  # noqa: E402
from entrolora.files import atomic_write_text  # noqa: E402
from entrolora.job import sft  # noqa: E402
from entrolora.job.run import prepare  # noqa: E402
from entrolora.train import TrainConfig  # noqa: E402


def untrained_scores(config: str, model: str | None = None) -> Iterator[tuple[str, dict]]:
    """``(split, evaluate_sft's scores)`` of the configuration's model (or ``model``), no adapter,
    for the validation split, then the test split; the model loads once."""
    setup = CONFIGS[config]
    # one batch of training rows: prepare() tokenizes them, and nothing here trains
    cfg = TrainConfig(model=model or setup.model, task="sft", limit=setup.batch_size,
                      max_length=setup.max_length, batch_size=setup.batch_size,
                      eval_batch_size=setup.eval_batch_size,
                      sft=SFTOptions(eval_split="validation"), progress=False)  # fmt: skip
    job = prepare(cfg, "lora", torch.device("cpu"))
    test = S.tokenize(job.tokenizer, S.load_math("test", cfg.sft), cfg.max_length,
                      cfg.sft.chat_template)  # fmt: skip
    for split, tokens in (("validation", job.test_ds), ("test", test)):
        yield split, sft.evaluate_sft(job.model, tokens, setup.eval_batch_size, job.device,
                                      job.tokenizer.pad_token_id)  # fmt: skip


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="math-cpu", choices=[k for k, s in CONFIGS.items()
                                                             if s.task == "sft"])  # fmt: skip
    ap.add_argument("--model", default=None, help="a local model folder (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--results", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.describe(common.machine_info(torch.device("cpu")))
    lines = [f"# python bench/quality/untrained.py --config {args.config}; {info}"]
    t0 = time.perf_counter()
    for split, m in untrained_scores(args.config, args.model):
        em, n = m["exact_match"], m["eval_examples"]
        lines.append(f"{split}: exact match {100 * em:.2f} % ({round(em * n)}/{n}), answer loss "
                     f"{m['eval_loss']:.4f} nats, {time.perf_counter() - t0:.0f} s")  # fmt: skip
        print(lines[-1], flush=True)
        t0 = time.perf_counter()
    atomic_write_text(args.results / args.config / "untrained.txt", "\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
