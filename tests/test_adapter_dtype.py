"""Adapters are float32 by default on a bf16 model (as peft), and small updates survive."""

from __future__ import annotations

import pytest
import torch

import entrolora as el
from entrolora.adapters.inject import adapted_modules, resolve_adapter_dtype
from test_adapters import CASES, _targets, randomize_
from tiny import lm_batches, tiny_llama

IDS = lm_batches(1, seed=3)[0]["input_ids"]


def bf16_model(case: str, **apply_kw):
    model = tiny_llama(layers=4).to(torch.bfloat16)
    plan = CASES[case](_targets(model, ["q_proj", "v_proj"]))
    el.apply(model, plan, **apply_kw)
    return model, plan


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kind_is_float32_on_a_bf16_model_and_trains(case):
    model, _ = bf16_model(case)
    randomize_(model)
    params = list(el.trainable_parameters(model))
    assert params and all(p.dtype == torch.float32 for p in params)
    for w in adapted_modules(model).values():
        assert w.base_layer.weight.dtype == torch.bfloat16  # the base is untouched
    out = model(IDS).logits
    assert out.dtype == torch.bfloat16  # the adapter's output is cast back to the base dtype
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


def adamw_100_steps(dtype: torch.dtype) -> float:
    """A parameter at 0.05 after 100 AdamW steps at lr 5e-5 with a constant gradient sign."""
    model, _ = bf16_model("plain", adapter_dtype=dtype)
    b = next(iter(adapted_modules(model).values())).adapter.B
    with torch.no_grad():
        b.fill_(0.05)
    opt = torch.optim.AdamW([b], lr=5e-5, weight_decay=0.0)
    for _ in range(100):
        opt.zero_grad()
        b[0, 0].backward()  # ∂/∂b₀₀ = 1: Adam moves it by lr each step
        opt.step()
    return float(b[0, 0].detach())


def test_small_updates_are_not_lost_on_a_bf16_model():
    assert adamw_100_steps(None) == pytest.approx(0.045, abs=2e-4)  # default: float32
    # what the default prevents: in bf16 each 5e-5 step is below half an ulp of 0.05 (2.4e-4)
    assert adamw_100_steps(torch.bfloat16) == pytest.approx(0.05, abs=1e-4)


def test_merge_and_unmerge_with_float32_adapters_on_a_bf16_base():
    model, _ = bf16_model("intervals")
    randomize_(model)
    before = model(IDS).logits.float()
    weights = {n: w.base_layer.weight.clone() for n, w in adapted_modules(model).items()}
    el.merge(model, keep_wrappers=True)
    for n, w in adapted_modules(model).items():
        assert w.base_layer.weight.dtype == torch.bfloat16
        assert not torch.equal(w.base_layer.weight, weights[n])
    merged = model(IDS).logits.float()
    # bf16 weights: the merged model differs from the unmerged one by bf16 rounding only
    assert torch.allclose(merged, before, atol=0.05, rtol=0.05)
    el.unmerge(model)
    for n, w in adapted_modules(model).items():
        # W + ΔW was stored in bf16: unmerge is exact up to one rounding of |W| + |ΔW|
        delta = w.adapter.delta_weight().detach().float()
        ulp = (weights[n].float().abs() + delta.abs()) * 2**-7 + 1e-6
        assert ((w.base_layer.weight.float() - weights[n].float()).abs() <= ulp).all()


def test_save_and_load_keep_float32_adapters(tmp_path):
    model, _ = bf16_model("blocks2")
    randomize_(model)
    el.save(model, tmp_path / "a")
    fresh = tiny_llama(layers=4).to(torch.bfloat16)
    el.load(fresh, tmp_path / "a")
    want = {n: w.adapter.A for n, w in adapted_modules(model).items()}
    for n, w in adapted_modules(fresh).items():
        assert w.adapter.A.dtype == torch.float32
        assert torch.equal(w.adapter.A, want[n])


@pytest.mark.parametrize(
    ("given", "base", "want"),
    [
        (None, torch.bfloat16, torch.float32),
        (None, torch.float16, torch.float32),
        (None, torch.float32, torch.float32),
        (None, torch.float64, torch.float64),  # a wider base keeps its dtype, as peft
        ("bfloat16", torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.float16),
    ],
)
def test_resolve_adapter_dtype(given, base, want):
    assert resolve_adapter_dtype(given, base) is want


def test_unknown_adapter_dtype_is_refused_and_leaves_the_model_alone():
    model = tiny_llama(layers=4).to(torch.bfloat16)
    plan = CASES["plain"](_targets(model, ["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"unknown adapter dtype 'fp8'; choose one of float32"):
        el.apply(model, plan, adapter_dtype="fp8")
    assert not adapted_modules(model)
    with pytest.raises(ValueError, match=r"adapter dtype must be a floating dtype .*torch.int8"):
        el.apply(model, plan, adapter_dtype=torch.int8)


def test_train_config_and_cli_take_adapter_dtype():
    from typer.testing import CliRunner

    from entrolora.adapters import inject
    from entrolora.cli import app
    from entrolora.job import TrainConfig
    from entrolora.job.config import ADAPTER_DTYPES, validate_config

    assert tuple(inject.ADAPTER_DTYPES) == ADAPTER_DTYPES
    assert TrainConfig().adapter_dtype is None  # float32 by default (resolve_adapter_dtype)
    with pytest.raises(ValueError, match=r"--adapter-dtype must be one of float32, bfloat16"):
        validate_config(TrainConfig(adapter_dtype="fp8"))
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--adapter-dtype" in help_text
