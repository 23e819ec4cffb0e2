"""apply / merge / unmerge / trainable_parameters over every adapter kind (adapters/inject.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import entrolora as el
from entrolora.adapters import AdaptedLinear
from entrolora.adapters.inject import adapted_modules, num_trainable_params
from entrolora.export.io import adapter_state
from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan
from test_adapters import (
    ALPHA,
    CASES,
    MODELS,
    _np,
    _targets,
    build,
    numpy_delta,
    numpy_weight,
    randomize_,
)
from tiny import lm_batches, tiny_gpt2, tiny_llama

IDS = lm_batches(1, seed=3)[0]["input_ids"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_dense_weight(case, model_name):
    model, plan = build(case, model_name)
    g = torch.Generator().manual_seed(7)
    for name, wrapper in adapted_modules(model).items():
        m = plan.modules[name]
        w = numpy_weight(wrapper.base_layer)
        dense = w + numpy_delta(wrapper.adapter, ALPHA, m.rank, w)
        x = torch.randn(2, 3, m.d_in, generator=g)
        bias = wrapper.base_layer.bias
        want = _np(x) @ dense.T + (0 if bias is None else _np(bias))
        with torch.no_grad():
            np.testing.assert_allclose(_np(wrapper(x)), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_keeps_outputs_and_is_idempotent(case):
    model, plan = build(case)
    before = logits(model)
    weights = {n: numpy_weight(w.base_layer) for n, w in adapted_modules(model).items()}
    deltas = {
        n: numpy_delta(w.adapter, ALPHA, plan.modules[n].rank, weights[n])
        for n, w in adapted_modules(model).items()
    }
    el.merge(model, keep_wrappers=True)
    merged = {n: numpy_weight(w.base_layer) for n, w in adapted_modules(model).items()}
    for n in weights:  # litgpt's check: W_after == W + ΔW
        np.testing.assert_allclose(merged[n], weights[n] + deltas[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    el.merge(model, keep_wrappers=True)  # twice: nothing changes
    for n, w in adapted_modules(model).items():
        np.testing.assert_array_equal(numpy_weight(w.base_layer), merged[n])
    model.train()  # train()/eval() never touch weights
    model.eval()
    for n, w in adapted_modules(model).items():
        np.testing.assert_array_equal(numpy_weight(w.base_layer), merged[n])
    el.unmerge(model)
    for n, w in adapted_modules(model).items():
        np.testing.assert_allclose(numpy_weight(w.base_layer), weights[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)

    plain = el.merge(model)
    assert not adapted_modules(plain)
    assert not any(isinstance(m, AdaptedLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), before, rtol=1e-5, atol=1e-5)
    after = {k: v.clone() for k, v in plain.state_dict().items()}
    el.merge(plain)  # merging a merged model changes nothing
    for k, v in plain.state_dict().items():
        assert torch.equal(v, after[k])


def test_merge_conv1d_transposes():
    model, plan = build("blocks4", "gpt2")
    before = logits(model)
    el.merge(model)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_count_matches_plan(case, model_name):
    model, plan = build(case, model_name)
    assert num_trainable_params(model) == plan.num_trainable_params()
    trainable = list(el.trainable_parameters(model))
    assert len({id(p) for p in trainable}) == len(trainable)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    if case != "lori":  # LoRI counts only the mask-kept entries of B
        assert sum(p.numel() for p in trainable) == plan.num_trainable_params()
    base = {id(p) for w in adapted_modules(model).values() for p in w.base_layer.parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) in base)


@pytest.mark.parametrize("case", ["intervals", "sharelora_slice", "dora", "vera", "lori"])
def test_shared_factors_are_one_object(case):
    model, plan = build(case)
    wrappers = adapted_modules(model)
    for gid, g in plan.groups.items():
        for factor in g.factors:
            tensors = [getattr(wrappers[n].adapter, factor) for n in g.members]
            assert all(t is tensors[0] for t in tensors), (gid, factor)
            assert tensors[0].shape[-1 if factor == "B" else 0] == g.rank or factor == "b"


def test_sharelora_members_slice_the_typewide_a():
    model, plan = build("sharelora_slice")
    for name, w in adapted_modules(model).items():
        a, _, _ = w.adapter.lora_factors()
        r = plan.modules[name].rank
        assert a.shape[0] == r and w.adapter.A.shape[0] == 3
        assert torch.equal(a, w.adapter.A[:r])


@pytest.mark.parametrize("case", ["intervals", "sharelora_slice", "dora", "vera", "lori"])
def test_one_sgd_step_moves_a_shared_parameter_once(case):
    model, _ = build(case)
    lr = 0.1
    owners: dict[
        int, list[tuple[str, str]]
    ] = {}  # live parameter → every (module, factor) using it
    for name, w in adapted_modules(model).items():
        for pname, p in w.adapter.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, pname))
    # reference: every member gets its own copy of each shared tensor; one step on the shared
    # parameter must equal one step with the sum of the copies' gradients
    ref = copy.deepcopy(model)
    ref_wrappers = adapted_modules(ref)
    for w in ref_wrappers.values():
        for pname, p in list(w.adapter.named_parameters(recurse=False)):
            setattr(w.adapter, pname, nn.Parameter(p.detach().clone()))
    ref(IDS, labels=IDS).loss.backward()

    live = list(el.trainable_parameters(model))
    before = [p.detach().clone() for p in live]
    opt = torch.optim.SGD(live, lr=lr)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    for p, b in zip(live, before):
        grad = sum(getattr(ref_wrappers[n].adapter, pn).grad for n, pn in owners[id(p)])
        torch.testing.assert_close(p.detach(), b - lr * grad, rtol=1e-5, atol=1e-6)
    assert max(len(v) for v in owners.values()) > 1  # something really is shared


def test_same_seed_same_adapters_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, _ = build("sharelora_slice", randomize=False, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build("sharelora_slice", randomize=False, seed=5)
    c, _ = build("sharelora_slice", randomize=False, seed=6)
    sa, sb, sc = (adapter_state(m) for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_adapted_modules_names_are_the_original_names():
    model = tiny_llama(layers=4)
    targets = _targets(model, ["q_proj", "v_proj"])
    el.apply(model, CASES["plain"](targets))
    assert list(adapted_modules(model)) == sorted(targets, key=list(adapted_modules(model)).index)
    assert set(adapted_modules(model)) == set(targets)


# -- bad inputs ------------------------------------------------------------------------------------
def test_double_apply_refused():
    model, plan = build("plain")
    with pytest.raises(ValueError, match="already has entrolora adapters"):
        el.apply(model, plan)


def test_plan_for_another_model_refused():
    _, plan = build("plain")
    with pytest.raises(ValueError, match="the model has no module"):
        el.apply(tiny_gpt2(layers=4), plan)
    with pytest.raises(ValueError, match="expects d_in×d_out 32×32 but the model has 48×48"):
        el.apply(tiny_llama(layers=4, hidden=48), plan)


def test_inconsistent_group_refused():
    model = tiny_llama(layers=2)
    t = _targets(model, ["q_proj", "v_proj"])
    names = list(t)  # q_proj 32→32 and v_proj 32→16 cannot share B
    mods = {
        n: ModulePlan(2, x.d_in, x.d_out, x.module_type, x.layer, group="g", shared={"B": "g"})
        for n, x in t.items()
    }
    plan = AdaptationPlan("bad", mods, {"g": GroupPlan(tuple(names), ("B",), 2, "mixed")})
    with pytest.raises(ValueError, match="group 'g' shares B between modules of different"):
        el.apply(model, plan)
    assert not adapted_modules(model)


def test_bad_apply_arguments():
    model = tiny_llama(layers=4)
    plan = CASES["plain"](_targets(model, ["q_proj"]))
    with pytest.raises(TypeError, match="el.apply: plan must be an AdaptationPlan, got dict"):
        el.apply(model, plan.to_dict())
    with pytest.raises(ValueError, match="dropout must be in"):
        el.apply(model, plan, dropout=1.5)
    with pytest.raises(ValueError, match="no entrolora adapters to merge"):
        el.merge(model)
    with pytest.raises(ValueError, match="no adapter wrappers to unmerge"):
        el.unmerge(model)


def test_dora_with_dropout_recomputes_base_output():
    model = tiny_gpt2(layers=4)  # Conv1D with bias: the no-dropout path subtracts it
    plan = CASES["dora"](_targets(model, ["c_attn"]))
    el.apply(model, plan, dropout=0.1)
    randomize_(model)
    model.eval()  # dropout off, but the wrapper takes the recompute path (not Identity)
    for name, wrapper in adapted_modules(model).items():
        w = numpy_weight(wrapper.base_layer)
        dense = w + numpy_delta(wrapper.adapter, ALPHA, plan.modules[name].rank, w)
        x = torch.randn(4, plan.modules[name].d_in)
        want = _np(x) @ dense.T + _np(wrapper.base_layer.bias)
        with torch.no_grad():
            np.testing.assert_allclose(_np(wrapper(x)), want, rtol=1e-4, atol=1e-5)
