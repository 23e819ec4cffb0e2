"""What a peft export says about itself: which consumers read it right (and notes on the rest), and
its README.md model card, in the layout peft writes (YAML front matter first).

It says what was trained (method, plan, ranks, metrics when known), on which base model, which
layout was written and which consumers read it, and how to load it in peft, transformers, vLLM
and llama.cpp (docs/serving.md has the measured details).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..guards import quote as Q

if TYPE_CHECKING:
    from ..plans import AdaptationPlan
    from .record import PeftExport


LLAMA_CPP_WARNING = (
    "compact layout: llama.cpp scales every module by lora_alpha / (its own rank) and never reads "
    "alpha_pattern, so this export gives WRONG outputs in llama.cpp; use layout='uniform' there"
)
GGUF_NOTE = (
    "trained on the Q4_1 GGUF copy of SmolLM2 (dequantised); the public float weights differ by "
    "that rounding: for the exact trained model use the HF-format base written by "
    "`entrolora export --hf-base` (or the --merged model)"
)


def consumers_and_notes(
    layout: str, use_dora: bool, task_type: str | None, gguf: bool = False
) -> tuple[tuple, tuple]:
    """``(consumers, notes)``: who reads this export correctly, and why the others are left out;
    ``gguf``: trained on the embedded GGUF copy of SmolLM2, whose weights differ by rounding."""
    consumers = ["peft", "transformers"]
    notes: list[str] = []
    if use_dora:
        notes.append(
            "DoRA: vLLM and llama.cpp do not load DoRA adapters; serve the --merged model there"
        )
    elif task_type != "CAUSAL_LM":
        task = task_type or "unknown (not a transformers model)"
        notes.append(f"task {task}: vLLM and llama.cpp serve causal-LM adapters only")
    else:
        consumers.append("vLLM")
        if layout == "uniform":
            consumers.append("llama.cpp")
        else:
            notes.append(LLAMA_CPP_WARNING)
    if gguf:
        notes.append(GGUF_NOTE)
    return tuple(consumers), tuple(notes)


PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification"}
AUTO_CLASSES = {
    "CAUSAL_LM": "CausalLM",
    "SEQ_CLS": "SequenceClassification",
    "TOKEN_CLS": "TokenClassification",
    "QUESTION_ANS": "QuestionAnswering",
    "SEQ_2_SEQ_LM": "Seq2SeqLM",
    "FEATURE_EXTRACTION": "FeatureExtraction",
}


def _front_matter(info: PeftExport, method: str) -> list[str]:
    # every user value quoted (guards/quote.py): a name could otherwise end the YAML block
    lines = ["---"]
    if info.base_model:
        lines.append(f"base_model: {Q.yaml(info.base_model)}")
    lines.append("library_name: peft")
    if info.task_type in PIPELINES:
        lines.append(f"pipeline_tag: {PIPELINES[info.task_type]}")
    lines.append("tags:")
    if info.base_model:
        lines.append(f"- {Q.yaml('base_model:adapter:' + info.base_model)}")
    lines += ["- lora", "- entrolora", f"- {Q.yaml(method)}", "- transformers", "---", ""]
    return lines


def _rank_table(info: PeftExport, plan: AdaptationPlan | None) -> list[str]:
    """Trained ranks per module type (min / max / modules), from the exported factors."""
    by_type: dict[str, list[int]] = {}
    for name, r in info.module_ranks.items():
        known = plan is not None and name in plan.modules
        mtype = plan.modules[name].module_type if known else name.rsplit(".", 1)[-1]
        by_type.setdefault(mtype, []).append(r)
    lines = [
        "| module type | modules | trained ranks (min–max) | total rank |",
        "|---|---|---|---|",
    ]
    for mtype, rs in sorted(by_type.items()):
        lines.append(f"| {Q.md_code(mtype)} | {len(rs)} | {min(rs)}–{max(rs)} | {sum(rs)} |")
    return lines


def _how_to_load(info: PeftExport) -> list[str]:
    auto = AUTO_CLASSES.get(info.task_type or "", "") or "CausalLM"
    name = info.base_model or "<base model folder>"
    # a Python literal (repr): a folder named with a quote and code stays a string when the
    # snippet is copied and run
    base = Q.py(name)
    # a backbone base (MiniLM) has no head: transformers sizes it from num_labels (default 2)
    labels = f", num_labels={info.num_labels}" if info.num_labels else ""
    lines = [
        "## How to load",
        "",
        "Replace `ADAPTER` with this folder's path.",
        "",
        f"peft, from this folder alone (it loads the base {Q.md(name)} named in "
        "`base_model_name_or_path`: a hub id needs the hub, a folder must exist):",
        "",
        "```python",
        f"from peft import AutoPeftModelFor{auto}",
        f"model = AutoPeftModelFor{auto}.from_pretrained('ADAPTER'{labels})",
        "```",
        "",
    ]
    return lines + _offline_lines(auto, base, labels) + _serving_lines(info)


def _offline_lines(auto: str, base: str, labels: str) -> list[str]:
    """peft and transformers loading the base from the ``--hf-base`` folder, offline."""
    return [
        "### Offline: the base as a local folder",
        "",
        "`entrolora export RUN --output BASE_HF --hf-base` writes the base model the run trained "
        "on as a Hugging Face folder `BASE_HF` (`--hf-base` is a flag; the folder is "
        "`--output`; from Python: `el.export_merged(model, 'BASE_HF', tokenizer, "
        "merge_adapters=False)`). Every consumer below loads the base from that folder, with no "
        "network:",
        "",
        "peft:",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import AutoModelFor{auto}",
        f"base = AutoModelFor{auto}.from_pretrained('BASE_HF')",
        "model = PeftModel.from_pretrained(base, 'ADAPTER')",
        "```",
        "",
        "transformers:",
        "",
        "```python",
        f"from transformers import AutoModelFor{auto}",
        f"base_model = {base}  # online: AutoModelFor{auto}.from_pretrained(base_model{labels})",
        f"model = AutoModelFor{auto}.from_pretrained('BASE_HF')",
        "model.load_adapter('ADAPTER')",
        "```",
        "",
    ]


def _serving_lines(info: PeftExport) -> list[str]:
    """vLLM and llama.cpp, for the consumers that read this export right."""
    lines: list[str] = []
    if "vLLM" in info.consumers:
        lines += [
            "vLLM (its `model` is a Hugging Face-format folder such as `BASE_HF`):",
            "",
            "```python",
            "from vllm import LLM, SamplingParams",
            "from vllm.lora.request import LoRARequest",
            f"llm = LLM(model='BASE_HF', enable_lora=True, max_lora_rank={info.max_lora_rank})",
            "out = llm.generate(['Hello'], SamplingParams(max_tokens=32),",
            "                   lora_request=LoRARequest('adapter', 1, 'ADAPTER'))",
            "```",
            "",
        ]
    if "llama.cpp" in info.consumers:
        lines += [
            "llama.cpp (the scripts shipped with llama.cpp; both read the `BASE_HF` folder):",
            "",
            "```sh",
            "python convert_hf_to_gguf.py BASE_HF --outfile base.gguf",
            "python convert_lora_to_gguf.py ADAPTER --base BASE_HF --outfile adapter.gguf",
            "llama-cli -m base.gguf --lora adapter.gguf",
            "```",
            "",
        ]
    return lines


def model_card(
    info: PeftExport, plan: AdaptationPlan | None, metrics: Mapping[str, Any] | None
) -> str:
    """README.md text for the export described by ``info`` (``plan``/``metrics`` when known)."""
    import peft

    from .._version import __version__

    method = plan.method if plan else "lora"
    lines = _front_matter(info, method)
    lines += [
        f"# {Q.md(method)} adapter{' for ' + Q.md(info.base_model) if info.base_model else ''}",
        "",
        f"A LoRA adapter trained with entrolora, method {Q.md_code(method)}"
        + (f", task {Q.md_code(info.task_type)}" if info.task_type else "")
        + ". Every entrolora adapter is an ordinary LoRA per module, so this is a stock peft "
        "checkpoint.",
        "",
        "## Export",
        "",
        f"- {info.summary()}",
    ]
    lines += [f"- note: {n}" for n in info.notes]
    lines += ["", "## Ranks", ""] + _rank_table(info, plan) + [""]
    if plan is not None:
        summary = plan.summary()
        lines += ["Plan:", "", Q.fence(summary) + "text", summary, Q.fence(summary), ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for k, v in metrics.items():
            lines.append(f"| {Q.md(k)} | {f'{v:.4g}' if isinstance(v, float) else Q.md(v)} |")
        lines.append("")
    lines += _how_to_load(info)
    lines += [
        "## Framework versions",
        "",
        f"- PEFT {peft.__version__}",
        f"- entrolora {__version__}",
        "",
    ]
    return "\n".join(lines)
