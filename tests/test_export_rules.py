"""The default export under the three consumers' scaling rules (METHODS.md §6), in float64 numpy.

Each rule is computed here from the saved files alone (safetensors read as numpy, the JSON
config), independently of peft's code: the merged weights ``W + s·B·A`` (DoRA: ``m ⊙ (W + s·B·A)
/ ‖W + s·B·A‖_row``) go into a float64 copy of the base model, whose outputs must equal the
trained entrolora model's, for every adapter kind:
- peft: ``s = alpha_pattern[m] / rank_pattern[m]`` (falling back to ``lora_alpha / r``);
- vLLM: ``s = lora_alpha / r`` for every module, patterns ignored;
- llama.cpp: ``s = lora_alpha / (the module's tensor rank)``, ``alpha_pattern`` never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import entrolora as el
from entrolora.export.record import VLLM_MAX_LORA_RANKS
from test_adapters import CASES, MODELS, build
from tiny import lm_batches

RULES = ("peft", "vllm", "llama.cpp")
IDS = lm_batches(1, seed=5)[0]["input_ids"]
KINDS = sorted(CASES) + ["flex"]


def build_any(case: str, model_name: str, seed: int = 2):
    """``test_adapters.build`` plus FlexLoRA (ranks made unequal by pruning) and a trained head."""
    if case == "flex":
        factory, patterns = MODELS[model_name]
        model = factory(layers=4, seed=0)
        plan = el.plan_flexlora(model, r=3, capacity=4, target_modules=patterns)
        el.apply(model, plan, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i, w in enumerate(el.adapted_modules(model).values()):
                for p in (w.adapter.P, w.adapter.Q, w.adapter.lambda_):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                for slot in range(i % 3):  # active ranks 3, 2, 1, 3, ...
                    w.adapter.deactivate(slot)
    else:
        model, _ = build(case, model_name, seed=seed)
    head = getattr(model, "classifier", None)
    if head is not None:  # a trained head: the export must carry it (modules_to_save)
        with torch.no_grad():
            head.weight.add_(
                torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.5
            )
    return model


def fresh_base(model_name: str) -> torch.nn.Module:
    return MODELS[model_name][0](layers=4, seed=0)


def outputs(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double().numpy()


def _rule_scale(rule: str, cfg: dict, name: str, rank: int) -> float:
    if rule == "vllm":
        return cfg["lora_alpha"] / cfg["r"]
    if rule == "llama.cpp":
        return cfg["lora_alpha"] / rank

    # peft: a pattern key matches a module whose name is the key or ends in ".key"
    def find(pattern: dict, default):
        for key, value in pattern.items():
            if name == key or name.endswith("." + key):
                return value
        return default

    return find(cfg["alpha_pattern"], cfg["lora_alpha"]) / find(cfg["rank_pattern"], cfg["r"])


def rule_model(folder: Path, rule: str, model_name: str) -> torch.nn.Module:
    """A float64 base model with the export folded in as ``rule`` reads it (numpy, float64)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = {
        k: v.astype(np.float64) for k, v in load_file(folder / "adapter_model.safetensors").items()
    }
    base = fresh_base(model_name).double()
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name in cfg["target_modules"]:
            a = tensors.pop(f"base_model.model.{name}.lora_A.weight")  # (r, d_in)
            b = tensors.pop(f"base_model.model.{name}.lora_B.weight")  # (d_out, r)
            weight = params[f"{name}.weight"]
            w = weight.numpy().T if cfg["fan_in_fan_out"] else weight.numpy()  # (d_out, d_in)
            new = w + _rule_scale(rule, cfg, name, a.shape[0]) * (b @ a)
            if cfg["use_dora"]:
                m = tensors.pop(f"base_model.model.{name}.lora_magnitude_vector")
                new = m[:, None] * new / np.linalg.norm(new, axis=1, keepdims=True)
            weight.copy_(torch.from_numpy(new.T if cfg["fan_in_fan_out"] else new))
        for head in cfg["modules_to_save"] or []:
            for key in [k for k in tensors if k.startswith(f"base_model.model.{head}.")]:
                params[key.removeprefix("base_model.model.")].copy_(
                    torch.from_numpy(tensors.pop(key))
                )
    assert not tensors, f"tensors no rule read: {sorted(tensors)[:3]}"
    return base.eval()


def max_error(folder: Path, rule: str, model_name: str, want: np.ndarray) -> float:
    return float(np.abs(outputs(rule_model(folder, rule, model_name)) - want).max())


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("case", KINDS)
def test_default_export_is_right_under_all_three_rules(case, model_name, tmp_path):
    model = build_any(case, model_name)
    want = outputs(model)
    scale = np.abs(want).max()  # tiny BERT's logits are ~5e-3: the tolerance is relative
    info = el.export_peft(model, tmp_path)
    assert info.layout == "uniform" and not info.rank_pattern
    assert np.abs(outputs(fresh_base(model_name)) - want).max() > 1e-2 * scale  # not a no-op
    for rule in RULES:
        assert max_error(tmp_path, rule, model_name, want) <= 1e-4 * scale, rule
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == info.rank == max(info.module_ranks.values())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
    assert cfg["target_modules"] == sorted(cfg["target_modules"])
    assert info.max_lora_rank == min(v for v in VLLM_MAX_LORA_RANKS if v >= info.rank)
    if case == "dora":
        assert cfg["use_dora"] and info.consumers == ("peft", "transformers")
    elif model_name == "bert":
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    else:
        assert cfg["task_type"] == "CAUSAL_LM"
        assert info.consumers == ("peft", "transformers", "vLLM", "llama.cpp")


@pytest.mark.parametrize("case", ["intervals", "blocks2", "flex", "dora"])
def test_compact_export_is_right_in_peft_and_vllm_wrong_in_llama_cpp(case, tmp_path):
    model = build_any(case, "llama")
    want = outputs(model)
    info = el.export_peft(model, tmp_path, layout="compact")
    assert info.layout == "compact" and info.rank_pattern == info.module_ranks
    assert "llama.cpp" not in info.consumers
    for rule in ("peft", "vllm"):
        assert max_error(tmp_path, rule, "llama", want) <= 1e-4 * np.abs(want).max(), rule
    # the documented failure: heterogeneous ranks, one global alpha over each tensor's rank
    assert len(set(info.module_ranks.values())) > 1
    assert max_error(tmp_path, "llama.cpp", "llama", want) > 1e-2 * np.abs(want).max()
    if case != "dora":
        assert any("WRONG outputs in llama.cpp" in n for n in info.notes)
    text = (tmp_path / "README.md").read_text()
    assert "compact layout" in text and "llama.cpp" in text


def test_vllm_max_lora_rank_is_the_smallest_accepted_value():
    from entrolora.export import vllm_max_lora_rank

    got = [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 14, 64, 65, 300, 320, 321, 512, 513)]
    assert got == [1, 8, 8, 16, 16, 64, 128, 320, 320, 512, 512, None]


@pytest.mark.parametrize("layout", ["uniform", "compact"])
def test_flex_module_with_no_active_direction_exports_as_one_zero_direction(layout, tmp_path):
    model = build_any("flex", "llama")
    wrappers = list(el.adapted_modules(model).values())
    for slot in range(wrappers[0].adapter.capacity):
        wrappers[0].adapter.deactivate(slot)  # the controller may prune a module to nothing
    want = outputs(model)
    info = el.export_peft(model, tmp_path, layout=layout)
    assert min(info.module_ranks.values()) == 0
    for rule in ("peft", "vllm") + (("llama.cpp",) if layout == "uniform" else ()):
        assert max_error(tmp_path, rule, "llama", want) <= 1e-4 * np.abs(want).max(), rule
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert layout == "uniform" or min(cfg["rank_pattern"].values()) == 1
