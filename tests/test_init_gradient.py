"""init='gradient' (METHODS.md §7) against float64 numpy: A's rows span the top right singular
directions of the signal gradient at Kaiming's norm, the step-0 output is unchanged, and the
first SGD update of B moves ΔW along exactly those directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import entrolora as el
from entrolora.adapters.gradient_init import kaiming_norm, signal_right_vectors
from entrolora.stats import GradientStats
from tiny import lm_batches, tiny_llama


def numpy_top(g: np.ndarray, d: np.ndarray | None, r: int) -> np.ndarray:
    """Projector on the top-r eigenvectors of GᵀG − DᵀD, float64 numpy."""
    n = g.T @ g - (0 if d is None else d.T @ d)
    vals, vecs = np.linalg.eigh(n)
    v = vecs[:, np.argsort(-vals)[:r]]
    return v @ v.T


def halves(d_out: int, d_in: int, rank: int = 3, steps: int = 16, noise: float = 0.5, seed=0):
    """Half means of ``steps`` batch gradients μ + white noise, μ of rank ``rank`` with well
    separated singular values 1, 0.6, 0.36, ... (times 1e-2)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, rank)))
    mu = (u * 0.6 ** np.arange(rank)) @ v.T * 1e-2
    batches = mu + noise * 1e-2 / math.sqrt(d_in) * rng.standard_normal((steps, d_out, d_in))
    return mu, batches[0::2].mean(0), batches[1::2].mean(0)


@pytest.mark.parametrize("shape", [(12, 12), (20, 8), (6, 16), (4, 30)])  # d_in > 2·d_out last
@pytest.mark.parametrize("noisy", [True, False])
def test_signal_right_vectors_match_numpy(shape, noisy):
    _, g1, g2 = halves(*shape, seed=sum(shape))
    g, d = (g1 + g2) / 2, (g1 - g2) / 2
    d = d if noisy else None
    r = 3
    v = signal_right_vectors(torch.from_numpy(g), None if d is None else torch.from_numpy(d), r)
    assert v.dtype == torch.float64 and v.shape == (r, shape[1])
    v = v.numpy()
    np.testing.assert_allclose(v @ v.T, np.eye(r), atol=1e-10)
    np.testing.assert_allclose(v.T @ v, numpy_top(g, d, r), atol=1e-8)


def one_layer(d_out: int, d_in: int) -> nn.Module:
    """A model whose one linear layer sits in a layer stack: ``layers.0.proj``."""
    torch.manual_seed(0)
    block = nn.Module()
    block.proj = nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
    model = nn.Module()
    model.layers = nn.ModuleList([block])
    return model


@pytest.mark.parametrize("shape", [(10, 14), (14, 10), (4, 30)])
def test_first_update_of_b_follows_the_top_signal_directions(shape):
    d_out, d_in = shape
    name = "layers.0.proj"
    mu, g1, g2 = halves(d_out, d_in, noise=0.2, seed=d_in)
    stats = GradientStats.from_halves({name: torch.from_numpy(g1)}, {name: torch.from_numpy(g2)})
    r = 2
    plan = el.plan_auto(stats, budget=r * (d_in + d_out), init="gradient", lora_alpha=4)
    assert plan.modules[name].rank == r
    model = one_layer(d_out, d_in)
    w = model.layers[0].proj.weight.detach().clone()
    el.apply(model, plan, stats=stats, adapter_dtype=torch.float64)
    layer = model.layers[0].proj
    a, b, scale = layer.adapter.lora_factors()
    g, d = (g1 + g2) / 2, (g1 - g2) / 2
    # A: the top-r signal directions, at the norm of LoRA's Kaiming draw; B = 0
    a = a.detach().numpy()
    np.testing.assert_allclose(a.T @ a / (a**2).sum() * r, numpy_top(g, d, r), atol=1e-8)
    assert np.linalg.norm(a) == pytest.approx(kaiming_norm(r, d_in), rel=1e-12)
    assert math.isclose(kaiming_norm(r, d_in), math.sqrt(r / 3))
    assert not b.detach().any()
    # step 0: the output is the base layer's
    x = torch.randn(5, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T)
    # a loss whose weight gradient is the true mean gradient μ: L = Σ (I·W_effᵀ) ⊙ μᵀ
    opt = torch.optim.SGD(el.trainable_parameters(model), lr=0.1)
    loss = (layer(torch.eye(d_in, dtype=torch.float64)) * torch.from_numpy(mu.T)).sum()
    loss.backward()
    opt.step()
    dw = layer.adapter.delta_weight().detach().numpy()
    # ΔW = −η·s²·μ·AᵀA: μ's step projected on the top-r signal directions
    tol = 1e-9 * np.abs(dw).max()
    np.testing.assert_allclose(dw, -0.1 * scale**2 * mu @ (a.T @ a), rtol=0, atol=tol)
    proj = numpy_top(g, d, r)
    np.testing.assert_allclose(dw @ proj, dw, rtol=0, atol=1e-6 * np.abs(dw).max())  # in the span
    # ... which spans μ's own top directions to within the probe's noise
    mu_top = numpy_top(mu, None, r)
    assert np.linalg.norm(proj - mu_top) < 0.2
    assert np.linalg.matrix_rank(dw, tol=1e-9 * np.abs(dw).max()) == r


def test_gradient_init_through_a_probe_keeps_the_output(tmp_path):
    model = tiny_llama(layers=2)
    stats = el.probe(model, lm_batches(4), "all-linear", steps=4, progress=False)
    plan = el.plan("auto", stats, budget=0.05, init="gradient")
    x = lm_batches(1, seed=5)[0]["input_ids"]
    before = model(input_ids=x).logits
    el.apply(model, plan, stats=stats)
    torch.testing.assert_close(model(input_ids=x).logits, before)
    for n, wrapper in el.adapted_modules(model).items():
        a = wrapper.adapter.A.detach().double()
        r = plan.modules[n].rank
        torch.testing.assert_close(
            a @ a.T, torch.eye(r, dtype=torch.float64) / 3, atol=1e-6, rtol=0
        )
    # a saved adapter loads as it is (no recomputation, no statistics needed)
    el.save(model, tmp_path / "a")
    again = el.load(tiny_llama(layers=2), tmp_path / "a")
    torch.testing.assert_close(again(input_ids=x).logits, before)


def test_gradient_init_bad_inputs():
    name = "layers.0.proj"
    _, g1, g2 = halves(6, 8)
    stats = GradientStats.from_halves(
        {name: torch.from_numpy(g1)}, {name: torch.from_numpy(g2)}, keep_gradients=False
    )
    plan = el.plan_auto(stats, budget=28, init="gradient")
    with pytest.raises(ValueError, match=r"needs the probed gradient of 'layers.0.proj'"):
        el.apply(one_layer(6, 8), plan, stats=stats)
    with pytest.raises(ValueError, match=r"needs the probed gradient"):
        el.apply(one_layer(6, 8), plan)
    from dataclasses import replace

    blocky = replace(plan, modules={name: replace(plan.modules[name], blocks=2)})
    with pytest.raises(ValueError, match=r"init='gradient' sets A of plain low-rank modules"):
        el.apply(one_layer(6, 8), blocky, stats=stats)


def _dist_worker(rank: int, world_size: int) -> dict:
    model = tiny_llama(layers=2)  # same seed: same weights on every rank
    batches = lm_batches(4, seed=10)[rank::world_size]
    stats = el.probe(model, batches, "all-linear", steps=2, progress=False)
    plan = el.plan("auto", stats, budget=0.05, init="gradient")
    el.apply(model, plan, stats=stats)
    return {n: w.adapter.A.detach().clone() for n, w in el.adapted_modules(model).items()}


def test_gradient_init_is_the_same_on_every_process():
    from dist_utils import run_distributed

    a, b = run_distributed(_dist_worker, 2)
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # ... and the same as one process probing all the batches
    model = tiny_llama(layers=2)
    stats = el.probe(model, lm_batches(4, seed=10), "all-linear", steps=4, progress=False)
    el.apply(model, el.plan("auto", stats, budget=0.05, init="gradient"), stats=stats)
    for n, w in el.adapted_modules(model).items():
        torch.testing.assert_close(w.adapter.A.detach(), a[n], atol=1e-5, rtol=1e-4)
