"""Exports that load on their own: AutoPeftModelFor… from the folder alone, merged HF folders,
portable ``base_model_name_or_path``, the model card, and the tokenizer save (METHODS.md §6)."""

from __future__ import annotations

import json

import pytest
import torch

import entrolora as el
from entrolora.export import peft as E
from test_adapters import CASES, MODELS, _targets, randomize_
from test_export_rules import KINDS, build_any
from tiny import lm_batches, tiny_llama

peft = pytest.importorskip("peft")
IDS = lm_batches(1, seed=9)[0]["input_ids"]
AUTO = {"llama": "CausalLM", "gpt2": "CausalLM", "bert": "SequenceClassification"}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def local_base(model_name: str, folder, num_labels: int | None = None):
    """The tiny base saved to ``folder`` and loaded back, so ``_name_or_path`` is that folder."""
    import transformers

    factory = MODELS[model_name][0]
    base = factory(layers=4, seed=0) if num_labels is None else factory(4, num_labels=num_labels)
    base.save_pretrained(folder)
    return getattr(transformers, type(base).__name__).from_pretrained(folder).eval()


def adapted(case: str, model, patterns) -> torch.nn.Module:
    el.apply(model, CASES[case](_targets(model, patterns)), seed=3)
    randomize_(model, 3)
    return model


@pytest.mark.parametrize(
    "case,model_name", [(c, "llama") for c in sorted(CASES)] + [("intervals", "gpt2"),
                        ("vera", "bert"), ("dora", "bert")]
)  # fmt: skip
def test_auto_peft_loads_from_the_folder_alone(case, model_name, tmp_path):
    model = adapted(case, local_base(model_name, tmp_path / "base"), MODELS[model_name][1])
    if model_name == "bert":
        with torch.no_grad():
            model.classifier.weight.mul_(-3.0)  # a trained head travels in modules_to_save
    want = logits(model)
    info = el.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((tmp_path / "base").resolve()) == info.base_model
    auto = getattr(peft, f"AutoPeftModelFor{AUTO[model_name]}")
    got = logits(auto.from_pretrained(str(tmp_path / "peft")).eval())
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_auto_peft_llama_classifier_carries_its_score_head(tmp_path):
    model = local_base("llama", tmp_path / "base", num_labels=3)
    adapted("plain", model, ["q_proj", "v_proj"])
    with torch.no_grad():
        model.score.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    want = logits(model)
    info = el.export_peft(model, tmp_path / "peft")
    assert info.task_type == "SEQ_CLS" and "vLLM" not in info.consumers and info.num_labels == 3
    card = (tmp_path / "peft" / "README.md").read_text()
    assert "from_pretrained('ADAPTER', num_labels=3)" in card
    got = logits(peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", KINDS)
def test_merged_folder_loads_with_plain_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for model_name, auto in (("llama", AutoModelForCausalLM),
                             ("bert", AutoModelForSequenceClassification)):  # fmt: skip
        model = build_any(case, model_name)
        want = logits(model)
        out = el.export_merged(model, tmp_path / model_name)
        assert el.adapted_modules(model)  # the given model keeps its adapters
        got = logits(auto.from_pretrained(tmp_path / model_name).eval())
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
        assert out == tmp_path / model_name and not any(out.glob("*lora*"))


def test_hf_base_folder_is_the_model_without_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_any("intervals", "llama")
    el.export_merged(model, tmp_path, merge_adapters=False)
    want = logits(MODELS["llama"][0](layers=4, seed=0))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), want)


def tiny_tokenizer(**kw):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", **kw)


def test_merged_folder_saves_a_tokenizer_loaded_with_a_dtype(tmp_path):
    """A tokenizer loaded with ``dtype=`` (as GGUF loading passes it) saves and reloads."""
    from transformers import AutoTokenizer

    tok = tiny_tokenizer(dtype=torch.float32)
    with pytest.raises(TypeError, match="not JSON serializable"):
        tok.save_pretrained(tmp_path / "plain")  # the bug the export works around
    el.export_merged(build_any("plain", "llama"), tmp_path / "merged", tok)
    again = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert again("hello world")["input_ids"] == tok("hello world")["input_ids"] == [2, 3]


def test_merged_export_clears_gguf_quantisation_markers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_any("plain", "llama")
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves
    el.export_merged(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved
    assert hasattr(model.config, "quantization_config")  # the caller's model is untouched
    AutoModelForCausalLM.from_pretrained(tmp_path)


# -- portable names, task types, card ------------------------------------------------------------
def test_portable_base_name(tmp_path, monkeypatch):
    from entrolora.data import datasets as D

    assert E.portable_base_name("org/model") == "org/model"  # a hub id stays
    assert E.portable_base_name(None) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert E.portable_base_name("mine") == str((tmp_path / "mine").resolve())
    gguf = tmp_path / "pkg" / D.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.touch()
    monkeypatch.setattr(D, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(D, "minilm_path", lambda: tmp_path / "minilm")
    (tmp_path / "minilm").mkdir()
    assert E.portable_base_name(str(gguf.parent)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        E.portable_base_name(str(tmp_path / "minilm")) == "sentence-transformers/all-MiniLM-L6-v2"
    )


def test_task_type_inferred_or_refused():
    from transformers import LlamaConfig, LlamaForTokenClassification, LlamaModel

    assert E.infer_task_type(tiny_llama(layers=1)) == "CAUSAL_LM"
    assert E.infer_task_type(tiny_llama(layers=1, num_labels=2)) == "SEQ_CLS"
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    assert E.infer_task_type(LlamaForTokenClassification(cfg)) == "TOKEN_CLS"
    assert E.infer_task_type(LlamaModel(cfg)) == "FEATURE_EXTRACTION"
    assert E.infer_task_type(torch.nn.Linear(2, 2)) is None


def test_model_card_names_method_ranks_metrics_and_consumers(tmp_path):
    model = build_any("intervals", "llama")
    info = el.export_peft(model, tmp_path, metrics={"accuracy": 0.8123, "steps": 40})
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: peft\n") or "library_name: peft" in text
    for want in ("method `e2lora`", "uniform layout", "| accuracy | 0.8123 |", "| steps | 40 |",
                 f"max_lora_rank={info.max_lora_rank}", "AutoPeftModelForCausalLM",
                 "convert_lora_to_gguf.py", "LoRARequest", "2–3"):  # fmt: skip
        assert want in text, want


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown export layout 'wide'; choose 'uniform'"):
        el.export_peft(build_any("plain", "llama"), tmp_path, layout="wide")
    assert not list(tmp_path.iterdir())


def test_embedded_minilm_exports_under_its_public_id():
    from entrolora.data import datasets as D

    try:
        folder = D.minilm_path()
    except FileNotFoundError:
        pytest.skip("the embedded MiniLM is not installed (make assets)")
    assert E.portable_base_name(str(folder)) == "sentence-transformers/all-MiniLM-L6-v2"
