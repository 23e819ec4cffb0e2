"""export_peft and to_peft_config (entrolora.export, METHODS.md §6) against the installed peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import entrolora as el
from entrolora.adapters.inject import adapted_modules
from entrolora.plans import AdaptationPlan, ModulePlan
from test_adapters import CASES, MODELS, _targets, build, randomize_
from tiny import lm_batches

peft = pytest.importorskip("peft")
IDS = lm_batches(1, seed=3)[0]["input_ids"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("layout", ["uniform", "compact"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_peft_with_equal_logits(case, model_name, layout, tmp_path):
    model, plan = build(case, model_name, seed=2)
    want = logits(model)
    info = el.export_peft(model, tmp_path, layout=layout)
    ranks = {n: m.rank * m.blocks for n, m in plan.modules.items()}
    assert info.path == tmp_path and info.rank == plan.max_rank and info.module_ranks == ranks
    factory = MODELS[model_name][0]
    base = factory(layers=4, seed=0)
    scale = want.abs().max().item()  # tiny BERT's logits are ~5e-3: tolerances relative to them
    assert (logits(base) - want).abs().max() > 1e-2 * scale  # the adapters change the output
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), want, rtol=1e-4, atol=1e-4 * scale)

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    names = list(plan.modules)
    assert cfg["target_modules"] == sorted(names)
    assert cfg["lora_alpha"] == cfg["r"] == plan.max_rank
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert cfg["rank_pattern"] == ({} if layout == "uniform" else ranks)
    assert cfg["use_dora"] == (case == "dora")
    assert cfg["fan_in_fan_out"] == (model_name == "gpt2")
    assert cfg["task_type"] == ("SEQ_CLS" if model_name == "bert" else "CAUSAL_LM")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    per_module = 3 if case == "dora" else 2
    heads = 2 if model_name == "bert" else 0  # the classifier's weight and bias
    assert len(tensors) == per_module * len(names) + heads
    for n, m in plan.modules.items():
        r = plan.max_rank if layout == "uniform" else ranks[n]
        a = tensors[f"base_model.model.{n}.lora_A.weight"]
        b = tensors[f"base_model.model.{n}.lora_B.weight"]
        assert a.shape == (r, m.d_in) and b.shape == (m.d_out, r)
        # uniform: the padding is exactly zero (zero rows of A, zero columns of B)
        assert not a[ranks[n] :].any() and not b[:, ranks[n] :].any()


def test_export_bakes_scale_into_b(tmp_path):
    model, plan = build("plain")
    el.export_peft(model, tmp_path, layout="compact")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for n, w in adapted_modules(model).items():
        a, b, scale = w.adapter.lora_factors()
        assert scale == 6.0 / plan.modules[n].rank
        torch.testing.assert_close(tensors[f"base_model.model.{n}.lora_B.weight"], b * scale)
        torch.testing.assert_close(tensors[f"base_model.model.{n}.lora_A.weight"], a)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_to_peft_config_trains_the_same_function(kind):
    """A plain plan as a peft LoraConfig: with the same factors, peft computes the same output."""
    from peft import get_peft_model

    if kind == "lora":
        model, plan = build("plain", seed=4)
    else:
        model = MODELS["llama"][0](layers=4)
        t = _targets(model, ["q_proj", "v_proj"])
        mods = {n: ModulePlan(2 + x.layer % 2, x.d_in, x.d_out, x.module_type, x.layer, kind="dora")
                for n, x in t.items()}  # fmt: skip
        plan = AdaptationPlan("dora", mods, lora_alpha=6.0)
        el.apply(model, plan)
        randomize_(model, 4)
    want = logits(model)
    config = el.to_peft_config(plan)
    assert config.lora_alpha == plan.lora_alpha and config.use_dora == (kind == "dora")
    assert set(config.target_modules) == set(plan.modules)
    pm = get_peft_model(MODELS["llama"][0](layers=4), config).eval()
    wrappers = adapted_modules(model)
    with torch.no_grad():
        for n, w in wrappers.items():
            layer = pm.base_model.model.get_submodule(n)
            a, b, _ = w.adapter.lora_factors()
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if kind == "dora":
                layer.lora_magnitude_vector["default"].weight.copy_(w.adapter.magnitude)
    torch.testing.assert_close(logits(pm), want, rtol=1e-4, atol=1e-4)


# -- refused ---------------------------------------------------------------------------------------
def test_to_peft_config_refuses_shared_block_and_exotic_plans():
    t = _targets(MODELS["llama"][0](layers=4), ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="shares factors .* peft has no shared adapters"):
        el.to_peft_config(CASES["intervals"](t))
    with pytest.raises(ValueError, match="block-diagonal module .* peft has no block-diagonal"):
        el.to_peft_config(CASES["blocks2"](t))
    with pytest.raises(ValueError, match=r"uses adapter kinds \['lori'\]"):
        el.to_peft_config(CASES["lori"](t))


def test_export_refuses_merged_and_plain_models(tmp_path):
    model, _ = build("plain")
    el.merge(model, keep_wrappers=True)
    with pytest.raises(ValueError, match="merged into the base weights; el.unmerge"):
        el.export_peft(model, tmp_path)
    with pytest.raises(ValueError, match="no entrolora adapters to export"):
        el.export_peft(MODELS["llama"][0](layers=1), tmp_path)
    assert not list(tmp_path.iterdir())


def test_export_refuses_mixed_dora_and_lora(tmp_path):
    model = MODELS["llama"][0](layers=4)
    t = _targets(model, ["q_proj", "v_proj"])
    mods = {
        n: ModulePlan(2, x.d_in, x.d_out, x.module_type, x.layer,
                      kind="dora" if "q_proj" in n else "lora")
        for n, x in t.items()
    }  # fmt: skip
    el.apply(model, AdaptationPlan("mixed", mods))
    with pytest.raises(ValueError, match="cannot hold DoRA and plain LoRA"):
        el.export_peft(model, tmp_path)


def test_export_progress_bar_for_large_models(tmp_path, monkeypatch):
    """A bar over the modules: shown when asked or for models of LARGE_MODEL_PARAMS or more."""
    from entrolora.export import peft as E
    from entrolora.export import record

    shown = []

    class Bar:
        def __init__(self, total, desc, enabled, unit):
            shown.append([total, enabled, 0])

        def update(self, n=1):
            shown[-1][2] += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(E, "progress_bar", Bar)
    model, plan = build("plain")
    el.export_peft(model, tmp_path / "a")  # a tiny model: no bar
    el.export_peft(model, tmp_path / "b", progress=True)
    monkeypatch.setattr(record, "LARGE_MODEL_PARAMS", 1)
    el.export_peft(model, tmp_path / "c")
    n = len(plan.modules)
    assert shown == [[n, False, n], [n, True, n], [n, True, n]]
