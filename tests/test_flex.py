"""FlexLoRA: SVD-form adapter, init, regulariser, schedule, importance, prune/expand, state, plot
(METHODS.md §5, revised)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import entrolora as el
from entrolora.adapters.flex import FlexAdapter
from entrolora.flex.controller import (
    STATE_FILE,
    FlexLoRA,
    FlexSchedule,
    flex_adapters,
    plot_rank_evolution,
    rank_matrix,
    select_moves,
    spectral_importance,
)
from tiny import lm_batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


# -- builders shared with test_flex_distributed ------------------------------------------------
def flex_llama(
    r: int = 2, capacity: int = 4, layers: int = 2, seed: int = 0, init: str = "lora"
) -> nn.Module:
    """A tiny random Llama with FlexAdapters on q_proj/v_proj, via plan_flexlora → apply."""
    model = tiny_llama(layers=layers, seed=seed)
    plan = el.plan_flexlora(model, r=r, capacity=capacity, target_modules=TARGETS, init=init)
    return el.apply(model, plan)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every FlexAdapter parameter and mask, cloned, by qualified name."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FlexAdapter):
            for k, v in [*mod.named_parameters(), *mod.named_buffers()]:
                out[f"{name}.{k}"] = v.detach().clone()
    return out


BATCHES = lm_batches(16, seed=1)


def train(model, flex, optimizer, steps, batches=None, on_step=None) -> None:
    """Plain loop: loss + regulariser, backward, flex.step, optimizer.step."""
    batches = batches or BATCHES
    for t in steps:
        loss = model(**batches[t % len(batches)]).loss + flex.regularizer()
        loss.backward()
        flex.step(t, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(t)


def numpy_delta(a: FlexAdapter) -> np.ndarray:
    p, q = a.P.detach().double().numpy(), a.Q.detach().double().numpy()
    lam = a.lambda_.detach().double().numpy() * a.mask.numpy()
    return a.lora_alpha / a.r0 * (p * lam) @ q


def randomize(a: FlexAdapter, seed: int) -> None:
    """Give λ distinct non-zero values and P, Q random entries on active slots (as after some
    training; P starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    m = a.mask.float()
    with torch.no_grad():
        a.lambda_.copy_((torch.rand(a.capacity, generator=g) + 0.1) * m)
        a.P.copy_(torch.randn(a.d_out, a.capacity, generator=g) * 0.3 * m)
        a.Q.copy_(torch.randn(a.capacity, a.d_in, generator=g) * 0.3 * m[:, None])


# -- the adapter -------------------------------------------------------------------------------
def test_adapter_forward_matches_dense_numpy():
    g = torch.Generator().manual_seed(0)
    a = FlexAdapter(d_in=6, d_out=5, rank=2, capacity=4, lora_alpha=8.0, generator=g)
    randomize(a, 1)
    with torch.no_grad():
        a.lambda_[3] = 7.0  # an inactive slot's λ must not act
        a.P[:, 3] = 1.0
    x = torch.randn(3, 4, 6, generator=g)
    want = x.double().numpy() @ numpy_delta(a).T
    np.testing.assert_allclose(a(x).detach().double().numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        a.delta_weight().detach().double().numpy(), numpy_delta(a), atol=1e-7
    )
    assert a.scale == 4.0 and a.rank == 2 and a.capacity == 4


def test_adapter_init_lora_speed_zero_impact_and_seed():
    a = FlexAdapter(70, 9, rank=3, generator=torch.Generator().manual_seed(5))
    b = FlexAdapter(70, 9, rank=3, generator=torch.Generator().manual_seed(5))
    assert a.capacity == 6 and a.mask.tolist() == [True] * 3 + [False] * 3 and a.init == "lora"
    assert torch.equal(a.Q, b.Q)
    assert not a.P.any()  # P = 0: zero impact, P learns as LoRA's B
    assert a.lambda_.tolist() == [1.0] * 3 + [0.0] * 3
    assert not a.Q[3:].any() and a.Q[:3].all()
    bound = 1 / np.sqrt(70)  # Kaiming-uniform as LoRA's A: U(−1/√d_in, 1/√d_in)
    q = a.Q[:3].detach().numpy()
    assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound
    assert abs(q.std() - bound / np.sqrt(3)) < 0.15 * bound
    assert a.delta_weight().abs().max() == 0


def test_adapter_init_paper():
    a = FlexAdapter(7, 9, rank=3, generator=torch.Generator().manual_seed(5), init="paper")
    assert not a.lambda_.any() and a.delta_weight().abs().max() == 0
    assert not a.P[:, 3:].any() and not a.Q[3:].any()
    assert a.P[:, :3].all() and 0.005 < a.P[:, :3].std().item() < 0.05
    with pytest.raises(ValueError, match="unknown FlexLoRA init 'svd'"):
        FlexAdapter(7, 9, rank=3, init="svd")


def test_flex_starts_exactly_as_lora():
    """Same seed: Q's active rows are LoRA's A, and P's first gradient is LoRA's B's."""
    lora = el.apply(
        tiny_llama(layers=2),
        el.plan_lora(tiny_llama(layers=2), r=2, target_modules=TARGETS),
        seed=3,
    )
    flex = el.apply(
        tiny_llama(layers=2),
        el.plan_flexlora(tiny_llama(layers=2), r=2, target_modules=TARGETS),
        seed=3,
    )
    batch = BATCHES[0]
    lora(**batch).loss.backward()
    flex(**batch).loss.backward()
    la = {n: m.adapter for n, m in el.adapted_modules(lora).items()}
    for name, a in flex_adapters(flex).items():
        A, B = la[name].A, la[name].B
        torch.testing.assert_close(a.Q[:2], A, rtol=0, atol=0)
        torch.testing.assert_close(a.P.grad[:, :2], B.grad, rtol=1e-5, atol=1e-7)
        assert B.grad.abs().max() > 0


def test_lora_factors_are_active_directions():
    a = FlexAdapter(6, 5, rank=3, capacity=5, generator=torch.Generator().manual_seed(0))
    randomize(a, 2)
    a.deactivate(1)
    a.activate(4, torch.randn(5), torch.randn(6))
    with torch.no_grad():
        a.lambda_[4] = -0.7
    A, B, scale = a.lora_factors()
    assert A.shape == (3, 6) and B.shape == (5, 3)
    np.testing.assert_allclose(
        scale * B.detach().double().numpy() @ A.detach().double().numpy(), numpy_delta(a), atol=1e-7
    )


def test_inactive_slots_get_zero_gradient():
    a = FlexAdapter(6, 5, rank=2, capacity=4, generator=torch.Generator().manual_seed(0))
    randomize(a, 3)
    with torch.no_grad():  # dirty inactive slots: they still must not act or learn
        a.P[:, 2:] = 1.0
        a.Q[2:] = 1.0
        a.lambda_[2:] = 1.0
    loss = a(torch.randn(4, 6)).square().sum() + a.orthogonality()
    loss.backward()
    assert not a.P.grad[:, 2:].any() and not a.Q.grad[2:].any() and not a.lambda_.grad[2:].any()
    assert a.P.grad[:, :2].any() and a.lambda_.grad[:2].any()


def numpy_orthogonality(a: FlexAdapter) -> float:
    """‖PₐᵀPₐ − I‖_F + ‖QₐQₐᵀ − I‖_F over active directions, float64, not squared."""
    idx = a.mask.numpy().nonzero()[0]
    p = a.P.detach().double().numpy()[:, idx]
    q = a.Q.detach().double().numpy()[idx]
    k = len(idx)
    return float(np.linalg.norm(p.T @ p - np.eye(k)) + np.linalg.norm(q @ q.T - np.eye(k)))


def test_orthogonality_matches_numpy_over_active_directions():
    a = FlexAdapter(6, 5, rank=3, capacity=5, generator=torch.Generator().manual_seed(0))
    a.activate(4, torch.randn(5), torch.randn(6))
    a.deactivate(0)
    with torch.no_grad():
        a.P[:, 0] = 3.0  # an inactive dirty slot must not count
    assert a.orthogonality().item() == pytest.approx(numpy_orthogonality(a), rel=1e-5)


def naive_distance(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """‖XₐᵀXₐ − I‖_F by gathering active columns, plain autograd (independent of flex_ops)."""
    out = []
    for xi, mi in zip(x, m.bool()):
        xa = xi[:, mi]
        out.append(torch.linalg.norm(xa.T @ xa - torch.eye(xa.shape[1], dtype=x.dtype)))
    return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_distance_grad_matches_autograd(seed):
    from entrolora.adapters.flex_ops import gram_distance, gram_distance_grad

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    x1 = x.clone().requires_grad_(True)
    naive_distance(x1, m).sum().backward()
    x2 = x.clone().requires_grad_(True)
    d = gram_distance(x2, m)
    d.sum().backward()
    norm, grad = gram_distance_grad(x, m)
    torch.testing.assert_close(d, naive_distance(x, m))
    torch.testing.assert_close(norm, d.detach())
    want = x1.grad * m[:, None, :]  # autograd gives inactive columns 0 as well
    torch.testing.assert_close(x2.grad, want)
    torch.testing.assert_close(grad, want)


def test_gram_distance_at_its_minimum_has_zero_gradient():
    """‖E‖ = 0 (orthonormal columns): not differentiable there; both paths give 0, no NaN."""
    from entrolora.adapters.flex_ops import gram_distance, gram_distance_grad

    x = torch.eye(5, 3, dtype=torch.float32)[None].clone().requires_grad_(True)
    m = torch.ones(1, 3)
    d = gram_distance(x, m)
    d.sum().backward()
    assert d.item() == 0.0 and not x.grad.any()
    assert not gram_distance_grad(x.detach(), m)[1].any()


def test_adapter_bad_inputs():
    with pytest.raises(ValueError, match="capacity 2 is below its initial rank 3"):
        FlexAdapter(4, 4, rank=3, capacity=2)
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        FlexAdapter(4, 4, rank=0)
    a = FlexAdapter(4, 3, rank=1)
    with pytest.raises(ValueError, match="activate needs p_col"):
        a.activate(1, torch.zeros(4), torch.zeros(4))


# -- schedule and importance -------------------------------------------------------------------
def numpy_budget(t, T, b0, tw, tf, dt) -> int:
    if not (tw <= t < T - tf and (t - tw) % dt == 0):
        return 0
    return int(np.clip(np.round(b0 * (1 - (t - tw) / np.float64(T - tf - tw)) ** 3), 0, b0))


@pytest.mark.parametrize("T,b0,tw,tf,dt", [(100, 4, 10, 10, 5), (37, 3, 0, 5, 1), (50, 8, 7, 0, 6)])
def test_schedule_matches_numpy(T, b0, tw, tf, dt):
    s = FlexSchedule(T, b0, tw, tf, dt)
    assert [s.budget(t) for t in range(-2, T + 3)] == [
        numpy_budget(t, T, b0, tw, tf, dt) for t in range(-2, T + 3)
    ]
    assert s.steps() == [t for t in range(T) if s.is_adjustment_step(t)]
    assert s.budget(tw) == b0


def test_schedule_defaults():
    s = FlexSchedule.default(200)
    assert (s.t_warmup, s.t_final, s.interval, s.b0) == (20, 20, 8, 4)


def test_schedule_refused():
    with pytest.raises(ValueError, match="schedule refused: T − t_final − t_warmup = 10 − 5 − 5"):
        FlexSchedule(10, 4, 5, 5, 1)
    with pytest.raises(ValueError, match="interval must be ≥ 1"):
        FlexSchedule(10, 4, 0, 0, 0)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        FlexSchedule(10.0, 4, 0, 0, 1)


def numpy_importance(lam) -> float:
    lam = np.asarray(lam, dtype=np.float64)
    if lam.size <= 1 or not np.any(lam):
        return 0.0
    s = lam**2 / np.sum(lam**2)
    return float(-np.sum(s * np.log(s + 1e-12)) / np.log(lam.size))


def test_importance_matches_numpy():
    rng = np.random.default_rng(0)
    for r in (2, 3, 8, 16):
        lam = rng.normal(size=r)
        assert spectral_importance(torch.tensor(lam)) == pytest.approx(numpy_importance(lam), 1e-12)
    assert spectral_importance([0.3, 0.3, 0.3]) == pytest.approx(1.0, abs=1e-9)
    assert spectral_importance([2.0]) == 0.0
    assert spectral_importance([0.0, 0.0]) == 0.0
    assert spectral_importance([0.0, 1.0]) == pytest.approx(numpy_importance([0.0, 1.0]), abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=12))
def test_importance_bounded_and_scale_free(lam):
    i = spectral_importance(lam)
    assert -1e-9 <= i <= 1 + 1e-9
    assert spectral_importance([3.0 * v for v in lam]) == pytest.approx(i, abs=1e-9)


def test_select_moves_example():
    imp = [0.5, 0.1, 0.9, 0.3, 0.7]
    ranks = [2, 2, 4, 1, 2]
    caps = [4, 4, 4, 4, 4]
    # Least important prunable: 1 (0.1), then 0 (0.5; module 3 is at r_min); most important
    # expandable: 4 (0.7), then 0 — which is already pruned, so only one pair.
    assert select_moves(imp, ranks, caps, budget=2) == ([1], [4])
    assert select_moves(imp, ranks, caps, budget=0) == ([], [])
    assert select_moves([0.0, 0.0, 0.0], [2, 2, 2], [4, 4, 4], budget=3) == ([0], [2])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_select_moves_properties(data):
    n = data.draw(st.integers(1, 8))
    caps = data.draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    ranks = [data.draw(st.integers(1, c)) for c in caps]
    imp = data.draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), min_size=n, max_size=n))
    r_min = data.draw(st.integers(1, 3))
    b = data.draw(st.integers(0, 5))
    prune, expand = select_moves(imp, ranks, caps, b, r_min)
    assert len(prune) == len(expand) <= b
    assert not set(prune) & set(expand)
    assert all(ranks[i] > r_min for i in prune) and all(ranks[i] < caps[i] for i in expand)
    if prune:
        assert max((imp[i], i) for i in prune) < min((imp[i], i) for i in expand)
    # The pruned are the least important prunable matrices.
    prunable = sorted((imp[i], i) for i in range(n) if ranks[i] > r_min)
    assert [i for _, i in prunable[: len(prune)]] == prune


# -- the controller on a tiny Llama ------------------------------------------------------------
def test_finds_modules_in_order():
    model = flex_llama(layers=2)
    flex = FlexLoRA(model, total_steps=20)
    assert list(flex.modules) == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert flex.ranks == dict.fromkeys(flex.modules, 2) and flex.total_rank == 8
    assert list(flex_adapters(model)) == list(flex.modules)


def test_regularizer_is_gamma_times_mean_of_norms():
    model = flex_llama(capacity=5)
    flex = FlexLoRA(model, total_steps=20, gamma=0.25)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    flex.expand(next(iter(flex.modules)))  # ranks differ between modules
    # each Pₐ and each Qₐ counts as one matrix: 2 per module
    want = sum(numpy_orthogonality(a) for a in flex.modules.values()) / (2 * len(flex.modules))
    got = flex.regularizer()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(0.25 * want, rel=1e-5)
    assert FlexLoRA(model, total_steps=20, gamma=0).regularizer().item() == 0.0


def test_regularizer_is_float32_under_autocast():
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20)
    want = flex.regularizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = flex.regularizer()
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_add_regularizer_grad_equals_backward():
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    flex.regularizer().backward()
    want = {n: (a.P.grad.clone(), a.Q.grad.clone()) for n, a in flex.modules.items()}
    model.zero_grad(set_to_none=True)
    flex.add_regularizer_grad()
    for n, a in flex.modules.items():
        torch.testing.assert_close(a.P.grad, want[n][0])
        torch.testing.assert_close(a.Q.grad, want[n][1])


def test_importance_is_eq3_on_the_exact_spectrum_of_the_update():
    model = flex_llama(r=3, capacity=5)
    flex = FlexLoRA(model, total_steps=20)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)  # P, Q far from orthonormal: λ alone is not the spectrum
    first = next(iter(flex.modules))
    flex.expand(first)  # P column 0: the new direction adds nothing to ΔW, yet counts in r
    imp = flex.importance()
    for n, a in flex.modules.items():
        sigma = np.linalg.svd(numpy_delta(a), compute_uv=False)
        r = int(a.mask.sum())
        assert imp[n] == pytest.approx(numpy_importance(sigma[:r]), abs=1e-10)
        lam = a.lambda_.detach().double().numpy()[a.mask.numpy()]
        assert abs(imp[n] - numpy_importance(lam)) > 1e-3  # not the λ reading
    assert flex.modules[first].rank == 4


def test_importance_lambda_is_the_papers_reading():
    model = flex_llama(capacity=5)
    flex = FlexLoRA(model, total_steps=20, importance="lambda")
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    imp = flex.importance()
    for n, a in flex.modules.items():
        lam = a.lambda_.detach().double().numpy()[a.mask.numpy()]
        assert imp[n] == pytest.approx(numpy_importance(lam), abs=1e-12)


def test_importance_of_a_zero_update_is_zero():
    flex = FlexLoRA(flex_llama(), total_steps=20)  # P = 0 at init: ΔW = 0
    assert set(flex.importance().values()) == {0.0}


@pytest.mark.parametrize("importance, slot", [("spectrum", 2), ("lambda", 1)])
def test_prune_removes_the_smallest_own_term_only(importance, slot):
    model = flex_llama(r=3, capacity=4)
    flex = FlexLoRA(model, total_steps=20, importance=importance)
    name, a = next(iter(flex.modules.items()))
    randomize(a, 0)
    with torch.no_grad():
        a.lambda_.copy_(torch.tensor([0.5, -0.05, -0.3, 0.0]))
        a.P[:, 2] *= 0.01  # slot 2's own term |λ|·‖p‖·‖q‖ is the smallest, slot 1's |λ| is
    terms = [abs(a.lambda_[i].item()) * a.P[:, i].norm().item() * a.Q[i].norm().item()
             for i in range(3)]  # fmt: skip
    assert int(np.argmin(terms)) == 2
    keep = [i for i in range(3) if i != slot]
    lam_slot = a.lambda_[slot].item()
    before = numpy_delta(a)
    p1 = a.P.detach().double().numpy()[:, slot].copy()
    q1 = a.Q.detach().double().numpy()[slot].copy()
    others = {n: b.delta_weight().detach().clone() for n, b in flex.modules.items() if n != name}
    wrapper = model.get_submodule(name)
    x = torch.randn(2, 3, a.d_in)
    y_before = wrapper(x).detach().double().numpy()

    assert flex.prune(name) == slot
    assert flex.ranks[name] == 2 and a.mask.nonzero().flatten().tolist() == keep
    assert a.lambda_[slot] == 0 and not a.P[:, slot].any() and not a.Q[slot].any()
    direction = a.scale * lam_slot * np.outer(p1, q1)
    np.testing.assert_allclose(numpy_delta(a), before - direction, atol=1e-9)
    y_want = y_before - x.double().numpy() @ direction.T
    np.testing.assert_allclose(wrapper(x).detach().double().numpy(), y_want, atol=1e-6)
    for n, d in others.items():
        assert torch.equal(flex.modules[n].delta_weight(), d)


@pytest.mark.parametrize("init", ["lora", "paper"])
def test_expand_leaves_outputs_exactly_unchanged(init):
    model = flex_llama(r=2, capacity=4, init=init)
    flex = FlexLoRA(model, total_steps=20, seed=3)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    ids = BATCHES[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    name = list(flex.modules)[1]
    a = flex.modules[name]
    assert flex.expand(name) == 2
    assert a.mask.tolist() == [True, True, True, False] and a.Q[2].all()
    if init == "lora":  # P column 0, λ = 1, Q row as LoRA's A (bound 1/√d_in)
        assert not a.P[:, 2].any() and a.lambda_[2] == 1
        assert a.Q[2].abs().max() <= 1 / np.sqrt(a.d_in)
    else:  # the paper's: λ = 0, P, Q ~ N(0, 0.02²)
        assert a.lambda_[2] == 0 and 0.005 < a.P[:, 2].std().item() < 0.05
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def _adam_state(opt) -> dict:
    return {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }


@pytest.mark.parametrize("kind", ["adamw_amsgrad", "sgd"])
def test_step_resets_only_moved_slots(kind):
    model = flex_llama(r=2, capacity=4)
    flex = FlexLoRA(model, total_steps=40, b0=2, t_warmup=4, t_final=4, interval=4)
    params = trainable(model)
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        keys = ["momentum_buffer"]
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, amsgrad=True, weight_decay=0.1)
        keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    train(model, flex, opt, range(4))  # step 4 is the first adjustment step
    (model(**BATCHES[4]).loss + flex.regularizer()).backward()
    masks = {n: a.mask.clone() for n, a in flex.modules.items()}
    state = _adam_state(opt)
    grads = {id(p): p.grad.clone() for p in params}
    pruned, expanded = flex.step(4, opt)
    assert len(pruned) == len(expanded) == 2
    for n, a in flex.modules.items():
        moved = (masks[n] != a.mask).nonzero().flatten().tolist()
        assert len(moved) == (n in pruned or n in expanded)
        keep = torch.ones(a.capacity, dtype=torch.bool)
        keep[moved] = False
        for p, sel in ((a.P, (slice(None), keep)), (a.lambda_, (keep,)), (a.Q, (keep,))):
            now, was = opt.state[p], state[id(p)]
            assert set(now) == set(was)
            for k in now:
                if k == "step":
                    assert torch.equal(now[k], was[k])
                    continue
                assert torch.equal(now[k][sel], was[k][sel]), k  # untouched: bit-identical
            assert torch.equal(p.grad[sel], grads[id(p)][sel])
            for slot in moved:
                idx = (slice(None), slot) if p is a.P else (slot,)
                assert all(not now[k][idx].any() for k in keys)
                assert not p.grad[idx].any()
    opt.step()
    for n in pruned:  # a pruned slot stays exactly zero through the optimizer step
        a = flex.modules[n]
        off = ~a.mask
        assert not a.P[:, off].any() and not a.lambda_[off].any() and not a.Q[off].any()


def test_whole_run_constant_rank_and_decisions_only_when_scheduled():
    model = flex_llama(r=2, capacity=4, layers=3)
    T = 30
    flex = FlexLoRA(model, total_steps=T, b0=3, t_warmup=3, t_final=5, interval=3)
    opt = torch.optim.AdamW(trainable(model), lr=2e-2)
    total = flex.total_rank
    seen = []

    def check(t):
        ranks = {n: a.rank for n, a in flex.modules.items()}
        assert ranks == flex.ranks and sum(ranks.values()) == total
        assert all(flex.r_min <= r <= 4 for r in ranks.values())
        seen.append(ranks)

    train(model, flex, opt, range(T), on_step=check)
    assert [s for s, _ in flex.history] == flex.schedule.steps() == [3, 6, 9, 12, 15, 18, 21, 24]
    changed = [t for t in range(1, T) if seen[t] != seen[t - 1]]
    assert changed and set(changed) <= set(flex.schedule.steps())
    assert seen[0] == dict.fromkeys(flex.modules, 2)  # step 0 is before t_warmup
    for s, ranks in flex.history:
        assert ranks == seen[s]
    assert len({tuple(r.values()) for _, r in flex.history}) > 1  # ranks really moved


def test_rank_one_modules_are_handled():
    model = flex_llama(r=1, capacity=3)
    flex = FlexLoRA(model, total_steps=12, b0=2, t_warmup=1, t_final=1, interval=2)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    assert set(flex.importance().values()) == {0.0}
    opt = torch.optim.AdamW(trainable(model), lr=2e-2)
    train(model, flex, opt, range(12))
    assert flex.total_rank == 4 and min(flex.ranks.values()) >= 1


def test_step_twice_for_one_step_adjusts_once():
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20, b0=2, t_warmup=0, t_final=0, interval=5)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    first = flex.step(0, None)
    assert first[0] and flex.step(0, None) == ([], []) and len(flex.history) == 1
    assert flex.step(3, None) == ([], [])  # not scheduled


@pytest.mark.parametrize("save_after", [8, 10])
def test_resume_from_checkpoint_equals_straight_run(tmp_path, save_after):
    T = 24
    opts = dict(total_steps=T, b0=2, t_warmup=4, t_final=4, interval=4, seed=7)

    def fresh():
        model = flex_llama(r=2, capacity=4)
        return model, torch.optim.AdamW(trainable(model), lr=2e-2, weight_decay=0.01)

    model, opt = fresh()
    flex = FlexLoRA(model, **opts)
    train(model, flex, opt, range(T))
    straight, straight_history = adapter_tensors(model), flex.history

    model, opt = fresh()
    flex = FlexLoRA(model, **opts)
    train(model, flex, opt, range(save_after + 1))
    assert flex.fresh.young  # young slots whose Adam correction must carry over
    el.save(model, tmp_path, flex=flex)  # weights, masks, plan, flex_state.json
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # the user's optimizer checkpoint (test only)
    del model, opt, flex

    model = el.load(tiny_llama(layers=2, seed=0), tmp_path)
    opt = torch.optim.AdamW(trainable(model), lr=2e-2, weight_decay=0.01)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    flex = FlexLoRA.from_checkpoint(model, tmp_path)
    train(model, flex, opt, range(save_after + 1, T))
    resumed = adapter_tensors(model)

    assert flex.history == straight_history and len(flex.history) == 4
    assert flex.options["seed"] == 7 and flex.options["interval"] == 4  # options round-trip
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_resume_history_equals_straight_history(tmp_path):
    T = 20
    opts = dict(total_steps=T, b0=2, t_warmup=2, t_final=2, interval=3, seed=1)
    model = flex_llama()
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    flex = FlexLoRA(model, **opts)
    train(model, flex, opt, range(T))
    straight = flex.history

    model = flex_llama()
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    flex = FlexLoRA(model, **opts)
    train(model, flex, opt, range(9))
    flex.save(tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["step"] == 8 and isinstance(state["rng_state"][0], int)
    resumed = FlexLoRA.from_checkpoint(model, tmp_path)
    train(model, resumed, opt, range(9, T))
    assert resumed.history == straight
    assert any(r != straight[0][1] for _, r in straight)


def test_export_peft_logits_equal(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    model = flex_llama(r=2, capacity=4)
    flex = FlexLoRA(model, total_steps=20, b0=2, t_warmup=0, t_final=0, interval=4)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    flex.step(0, None)
    assert len(set(flex.ranks.values())) > 1  # heterogeneous ranks
    ids = BATCHES[0]["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    el.export_peft(model, tmp_path / "peft")
    base = tiny_llama(layers=2, seed=0)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_save_with_el_save_and_load(tmp_path):
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20, b0=2, t_warmup=0, t_final=0, interval=4, seed=2)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    flex.step(0, None)
    el.save(model, tmp_path, flex=flex)
    assert json.loads((tmp_path / STATE_FILE).read_text())["ranks"] == flex.ranks
    loaded = el.load(tiny_llama(layers=2, seed=0), tmp_path)
    again = FlexLoRA.from_checkpoint(loaded, tmp_path)
    assert again.ranks == flex.ranks and again.history == flex.history
    assert torch.equal(again.generator.get_state(), flex.generator.get_state())


# -- bad inputs --------------------------------------------------------------------------------
def test_model_without_flex_adapters():
    with pytest.raises(ValueError, match="the model has no FlexLoRA adapters"):
        FlexLoRA(tiny_llama(layers=1), total_steps=10)


def test_r_min_above_rank():
    with pytest.raises(ValueError, match="r_min=3 is above the rank 2"):
        FlexLoRA(flex_llama(r=2), total_steps=10, r_min=3)
    with pytest.raises(ValueError, match="r_min must be an int ≥ 1"):
        FlexLoRA(flex_llama(r=2), total_steps=10, r_min=0)


def test_schedule_refused_by_controller():
    with pytest.raises(ValueError, match="schedule refused"):
        FlexLoRA(flex_llama(), total_steps=10, t_warmup=6, t_final=4)


def test_bad_options():
    model = flex_llama()
    with pytest.raises(ValueError, match="gamma must be a finite number ≥ 0"):
        FlexLoRA(model, total_steps=10, gamma=-1.0)
    with pytest.raises(ValueError, match="importance must be spectrum or lambda, got 'sigma'"):
        FlexLoRA(model, total_steps=10, importance="sigma")
    with pytest.raises(ValueError, match="FlexLoRA init must be one of lora, paper, got 'svd'"):
        el.plan_flexlora(tiny_llama(layers=1), r=2, target_modules=TARGETS, init="svd")
    with pytest.raises(TypeError, match="needs the int step index"):
        FlexLoRA(model, total_steps=10).step(1.0, None)


def test_optimizer_without_flex_params():
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=10, t_warmup=0, t_final=0, interval=1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold the FlexLoRA parameters"):
        flex.step(0, opt)


def test_unknown_optimizer_state_key_warns_and_is_kept():
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=10, b0=2, t_warmup=0, t_final=0, interval=1)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    for p in trainable(model):
        opt.state[p]["my_ema"] = torch.ones_like(p)
        opt.state[p]["step"] = torch.tensor(3.0)
    with pytest.warns(UserWarning, match="does not know the optimizer state 'my_ema'"):
        pruned, expanded = flex.step(0, opt)
    assert pruned and expanded
    assert all(bool((opt.state[p]["my_ema"] == 1).all()) for p in trainable(model))


def test_prune_and_expand_limits():
    model = flex_llama(r=1, capacity=1)
    flex = FlexLoRA(model, total_steps=10)
    name = next(iter(flex.modules))
    with pytest.raises(ValueError, match="already at r_min=1"):
        flex.prune(name)
    with pytest.raises(ValueError, match="all 1 slots are active"):
        flex.expand(name)
    with pytest.raises(ValueError, match="is not a FlexLoRA module"):
        flex.prune("nope")


def test_load_state_mismatches(tmp_path):
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20, b0=2, t_warmup=0, t_final=0, interval=4)
    for i, a in enumerate(flex.modules.values()):
        randomize(a, i)
    state = flex.state_dict()
    with pytest.raises(ValueError, match="saved with other options"):
        FlexLoRA(model, total_steps=30, b0=2, t_warmup=0, t_final=0, interval=4).load_state_dict(
            state
        )
    flex.step(0, None)
    moved = flex.state_dict()
    with pytest.raises(ValueError, match="load the adapter weights and masks"):
        FlexLoRA(flex_llama(), **flex.options).load_state_dict(moved)
    with pytest.raises(ValueError, match="not a FlexLoRA controller state"):
        flex.load_state_dict({"format": "other"})
    with pytest.raises(ValueError, match="state is malformed"):
        flex.load_state_dict({"format": "entrolora.flex", "format_version": 2})
    with pytest.raises(ValueError, match="version 1 is not 2"):
        flex.load_state_dict({"format": "entrolora.flex", "format_version": 1})
    with pytest.raises(ValueError, match="does not exist"):
        FlexLoRA.from_checkpoint(model, tmp_path)
    (tmp_path / STATE_FILE).write_text("{nope")
    with pytest.raises(ValueError, match="is not valid JSON"):
        FlexLoRA.from_checkpoint(model, tmp_path)


# -- plot --------------------------------------------------------------------------------------
def test_plot_rank_evolution_writes_png(tmp_path):
    history = [
        (s, {"model.layers.10.q": 2 + (s % 3 == 0), "model.layers.2.q": 2, "model.layers.0.v": 2})
        for s in range(0, 40, 4)
    ]
    names, steps, ranks = rank_matrix(history)
    assert names == ["model.layers.0.v", "model.layers.2.q", "model.layers.10.q"]
    assert steps == list(range(0, 40, 4)) and ranks[2][0] == 3
    out = plot_rank_evolution(history, tmp_path / "ranks.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="history is empty"):
        plot_rank_evolution([], tmp_path / "none.png")


# -- integrations ------------------------------------------------------------------------------
def test_trainer_callback_matches_plain_loop(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from entrolora.integrations.flex_callback import FlexLoRACallback

    T = 12
    opts = dict(total_steps=T, b0=2, t_warmup=2, t_final=2, interval=3, seed=4)
    ids = BATCHES[0]["input_ids"]  # 2 sequences: one full batch per step, whatever the order
    data = [{"input_ids": row, "labels": row} for row in ids]

    model = flex_llama()
    flex = FlexLoRA(model, **opts)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=T,
        per_device_train_batch_size=2,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[FlexLoRACallback(flex)]).train()

    ref_model = flex_llama()
    ref = FlexLoRA(ref_model, **opts)
    opt = torch.optim.AdamW(trainable(ref_model), lr=2e-2, weight_decay=0.0)
    train(ref_model, ref, opt, range(T), batches=[{"input_ids": ids, "labels": ids}])
    assert flex.history == ref.history and len(flex.history) == len(flex.schedule.steps())
    got, want = adapter_tensors(model), adapter_tensors(ref_model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_callback_needs_a_controller():
    from entrolora.integrations.flex_callback import FlexLoRACallback

    with pytest.raises(TypeError, match="needs an entrolora.FlexLoRA controller"):
        FlexLoRACallback(object())


def test_example_loop_runs(tmp_path):
    from scripts import load_script

    example = load_script("examples/flexlora_loop.py")
    flex = example.main(["--steps", "12", "--out", str(tmp_path)])
    assert flex.history and (tmp_path / "rank_evolution.png").stat().st_size > 0
    assert (tmp_path / "adapter" / STATE_FILE).is_file()
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
