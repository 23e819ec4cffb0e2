"""What a peft export is: ``PeftExport`` (what ``export_peft`` wrote and who reads it), the
layouts and the rank values consumers accept. Below both the export and its model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYOUTS = ("uniform", "compact")
#: The only ``max_lora_rank`` values vLLM accepts (METHODS.md §6).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Heads peft itself puts in ``modules_to_save`` for SEQ_CLS (peft's own list).
HEAD_NAMES = ("classifier", "score")
# a progress bar for exports of models at least this large (parameters), unless told otherwise
LARGE_MODEL_PARAMS = 10**9
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class PeftExport:
    """What ``export_peft`` wrote and who can read it.

    ``rank`` is the config's ``r`` (= ``lora_alpha``; the padded rank R in ``uniform``),
    ``module_ranks`` each module's trained rank, ``rank_pattern`` what the config's pattern holds
    (empty in ``uniform``), ``max_lora_rank`` the smallest value vLLM accepts that covers the
    export (None above 512), ``consumers`` the tools that read it correctly, ``notes`` the caveats.
    """

    path: Path
    layout: str
    rank: int
    max_lora_rank: int | None
    task_type: str | None
    base_model: str | None
    consumers: tuple[str, ...]
    module_ranks: dict[str, int] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    num_labels: int | None = None  # SEQ_CLS: AutoPeftModel needs it when the base is a backbone

    def summary(self) -> str:
        """One line for people: layout, rank, consumers, vLLM's ``max_lora_rank``."""
        ranks = sorted(set(self.module_ranks.values()))
        span = f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else f"{ranks[0]}"
        how = (
            f"every module at rank {self.rank}, trained ranks {span} zero-padded"
            if self.layout == "uniform"
            else f"each module at its own rank ({span}), rank_pattern = alpha_pattern"
        )
        vllm = f"; vLLM max_lora_rank={self.max_lora_rank}" if "vLLM" in self.consumers else ""
        return f"{self.layout} layout ({how}); serves {', '.join(self.consumers)}{vllm}"


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that is ≥ ``rank`` (None when above 512)."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def is_large(model: Any) -> bool:
    """Whether ``model`` holds ``LARGE_MODEL_PARAMS`` parameters or more (export shows a bar)."""
    return sum(p.numel() for p in model.parameters()) >= LARGE_MODEL_PARAMS
