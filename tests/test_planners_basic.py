"""Reference planners (LoRA, ShareLoRA, FlexLoRA) and the by-name dispatch ``plan``."""

from __future__ import annotations

import json

import pytest
import torch

import entrolora as el
from entrolora.planners import PLANNERS, planner_options
from tiny import tiny_gpt2, tiny_llama

Q = "model.layers.{}.self_attn.q_proj"
V = "model.layers.{}.self_attn.v_proj"
QT = "model.layers.*.self_attn.q_proj"


def stats(layers=3):
    g = torch.Generator().manual_seed(0)
    grads = {}
    for i in range(layers):
        grads[Q.format(i)] = torch.randn(32, 32, generator=g) * 1e-3
        grads[V.format(i)] = torch.randn(16, 32, generator=g) * 1e-3
    weights = {n: torch.randn(t.shape, generator=g) for n, t in grads.items()}
    noise = {n: torch.randn(t.shape, generator=g) * 1e-4 for n, t in grads.items()}
    s = el.GradientStats.from_gradients(grads, weights, noise=noise)
    # as a probe of ≥ 3 batches has: the moments' sampling covariance (here 0), which E²LoRA's
    # default boundaries="significant" reads
    s.moment_cov = {t: [[0.0] * (2 * len(ns))] * (2 * len(ns)) for t, ns in s.types.items()}
    return s


def test_lora_from_stats_and_model_agree():
    model = tiny_llama(layers=3)  # q_proj 32→32, v_proj 32→16 (2 kv heads of 8)
    a = el.plan_lora(stats(), r=4)
    b = el.plan_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    assert a.modules == b.modules and a.method == b.method == "lora"
    assert a.num_trainable_params() == 3 * 4 * (32 + 32) + 3 * 4 * (32 + 16)
    assert a.lora_alpha == 8.0 and a.options == {"r": 4, "target_modules": None, "lora_alpha": 8.0}
    assert b.options["target_modules"] == ["q_proj", "v_proj"]
    b.validate(model)


def test_lora_on_gpt2_conv1d():
    model = tiny_gpt2(layers=2)
    p = el.plan_lora(model, r=2, target_modules=["c_attn"])
    m = p.modules["transformer.h.0.attn.c_attn"]
    assert (m.d_in, m.d_out) == (32, 96)
    p.validate(model)


def test_stats_filtered_by_target_modules():
    p = el.plan_lora(stats(), r=2, target_modules=["q_proj"])
    assert sorted(p.modules) == [Q.format(i) for i in range(3)]
    p = el.plan_lora(stats(), r=2, target_modules=r".*\.[01]\.self_attn\.v_proj")
    assert sorted(p.modules) == [V.format(i) for i in range(2)]


def test_stats_target_modules_matching_nothing():
    with pytest.raises(ValueError, match="matched none of the statistics' modules"):
        el.plan_lora(stats(), target_modules=["k_proj"])


def test_model_needs_target_modules():
    with pytest.raises(ValueError, match="planning from a model needs target_modules="):
        el.plan_lora(tiny_llama(layers=2))


def test_model_target_modules_typo():
    with pytest.raises(ValueError, match="matched no module"):
        el.plan_sharelora(tiny_llama(layers=2), target_modules=["q_prj"])


def test_wrong_input_type():
    with pytest.raises(TypeError, match="needs GradientStats or an nn.Module"):
        el.plan_lora({"a": 1})


def test_sharelora_layout():
    p = el.plan_sharelora(stats(), r=4)
    for t in (QT, "model.layers.*.self_attn.v_proj"):
        g = p.groups[f"{t}:A"]
        assert g.factors == ("A",) and g.rank == 4 and len(g.members) == 3
        for n in g.members:
            assert p.modules[n].shared == {"A": f"{t}:A"} and p.modules[n].group == f"{t}:A"
    # one A per type, a B per layer
    assert p.num_trainable_params() == 2 * 4 * 32 + 3 * 4 * 32 + 3 * 4 * 16


def test_flexlora():
    p = el.plan_flexlora(stats(), r=3)
    assert {(m.kind, m.rank, m.capacity) for m in p.modules.values()} == {("flex", 3, 6)}
    assert p.options["capacity"] == 6
    assert p.num_trainable_params() == 3 * 3 * (32 + 1 + 32) + 3 * 3 * (16 + 1 + 32)
    p = el.plan_flexlora(tiny_llama(layers=2), r=2, capacity=5, target_modules=["o_proj"])
    assert {m.capacity for m in p.modules.values()} == {5}


def test_flexlora_capacity_below_r():
    with pytest.raises(ValueError, match=r"capacity=3 is out of range: allowed r..min.* = 4..16"):
        el.plan_flexlora(stats(), r=4, capacity=3)


@pytest.mark.parametrize("fn", [el.plan_lora, el.plan_sharelora, el.plan_flexlora])
def test_rank_must_be_positive(fn):
    with pytest.raises(ValueError, match="r must be an integer ≥ 1"):
        fn(stats(), r=0)


def test_lora_alpha_validated():
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        el.plan_lora(stats(), lora_alpha="big")


# -- dispatch -------------------------------------------------------------------------------------
def test_registry_names():
    assert list(PLANNERS) == [
        "lora", "sharelora", "e2lora", "e2sharelora", "e2dora", "e2vera", "e2lori", "ralora",
        "ralora_pro", "ls_lora", "lora_gid", "flexlora", "auto",
    ]  # fmt: skip


# auto (tests/test_planners_auto.py) plans under a budget from singular values, and adapts only
# the modules it buys
@pytest.mark.parametrize("method", [m for m in PLANNERS if m != "auto"])
def test_every_planner_by_name(method):
    s = stats()
    p = el.plan(method.replace("_", "-"), s)
    assert p.method == method
    assert set(p.modules) == set(s.modules)
    assert el.AdaptationPlan.from_dict(json.loads(p.to_json())) == p
    assert p.num_trainable_params() > 0
    # every declared option is recorded (resolved) in plan.options
    for key in planner_options(method):
        if key != "target_modules":
            assert key in p.options, key
            if planner_options(method)[key] is not None:
                assert p.options[key] == planner_options(method)[key]


def test_planner_options():
    assert planner_options("ralora-pro") == {
        "r_ref": 8, "r_min": None, "r_max": None, "n_max": 32, "statistics": "signal",
        "lora_alpha": None,
    }  # fmt: skip
    opts = planner_options("e2lori")
    assert opts["sparsity"] == 0.9 and opts["allocation"] == "shifted" and opts["r"] == 8
    assert planner_options("lora") == {"r": 8, "target_modules": None, "lora_alpha": None}


def test_unknown_method():
    with pytest.raises(
        ValueError, match="unknown method 'adalora'; known methods: lora, sharelora"
    ):
        el.plan("adalora", stats())


def test_unknown_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'rank' .* accepted: r, n_max"):
        el.plan("ralora", stats(), rank=4)


def test_plan_passes_options():
    p = el.plan("e2lora", stats(), r=2, allocation="uniform", budget="layers")
    assert (p.options["r"], p.options["allocation"], p.options["budget"]) == (
        2,
        "uniform",
        "layers",
    )
    p = el.plan("lora", tiny_llama(layers=2), r=2, target_modules=["q_proj"])
    assert len(p.modules) == 2
