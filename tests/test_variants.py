"""E²LoRI and E²VeRA as their papers define them (METHODS.md §3), against independent
computations: LoRI's mask from calibration magnitudes |∂L/∂B| = |Σ_l s·G_l·A_lᵀ| (checked
against autograd and numpy), VeRA's frozen matrices, scaling and d/b init against peft's own
VeRA; masks and matrices survive save/load, and the peft exports reproduce the outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import entrolora as el
from entrolora.adapters.inject import adapted_modules
from entrolora.adapters.variants import LoRIAdapter, VeRAAdapter
from entrolora.plans import lori_kept
from tiny import lm_batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def probed(model, steps: int = 2):
    """Real gradients of the tiny model (the probe keeps them by default)."""
    return el.probe(model, lm_batches(steps, seed=1), TARGETS, steps=steps, progress=False)


def lori_plan(stats, sparsity=0.75, **kw):
    # threshold ~0: every layer of a type in one interval, so that B is shared by several layers
    return el.plan_e2lori(stats, r=2, sparsity=sparsity, threshold=1e-9, **kw)


def lori_adapters(model) -> dict[str, LoRIAdapter]:
    return {n: w.adapter for n, w in adapted_modules(model).items()}


def outputs(model, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in el.trainable_parameters(model):
        p.add_(torch.randn(p.shape, generator=g) * 0.2)


# -- E²LoRI ----------
def test_lori_mask_keeps_largest_calibration_magnitudes():
    model = tiny_llama()
    stats = probed(model)
    plan = lori_plan(stats)
    el.apply(model, plan, stats=stats, seed=3)
    ads = lori_adapters(model)
    groups: dict[int, list[str]] = {}
    for n, a in ads.items():
        groups.setdefault(id(a.mask), []).append(n)
    assert any(len(g) > 1 for g in groups.values())  # a B shared by an interval is covered
    for names in groups.values():
        mask = ads[names[0]].mask
        score = np.zeros(tuple(mask.shape))
        for n in names:  # numpy float64: Σ over the layers sharing B of s·G·A[:r]ᵀ
            a = ads[n]
            g = stats.gradients[n].double().numpy()
            score[:, : a.rank] += a.scale * g @ a.A[: a.rank].double().numpy().T
        keep = lori_kept(mask.numel(), 0.75)
        flat = np.abs(score).ravel()
        want = np.zeros(flat.size, dtype=bool)
        want[np.argsort(-flat, kind="stable")[:keep]] = True
        assert int(mask.sum()) == keep
        assert np.array_equal(mask.numpy().ravel(), want)
        assert all(ads[n].mask is mask for n in names)  # one mask per shared B


def test_calibration_magnitude_is_bs_first_gradient():
    """With nothing masked (sparsity 0), autograd's ∂L/∂B at init on the probe's batches (mean
    loss) equals Σ_l s·G_l·A_lᵀ — the quantity the mask ranks."""
    model = tiny_llama()
    batches = lm_batches(2, seed=1)
    stats = el.probe(model, batches, TARGETS, steps=2, progress=False)
    el.apply(model, lori_plan(stats, sparsity=0.0), stats=stats, seed=3)
    model.zero_grad()
    (sum(model(**b).loss for b in batches) / len(batches)).backward()
    ads = lori_adapters(model)
    seen = set()
    for a in ads.values():
        if id(a.B) in seen:
            continue
        seen.add(id(a.B))
        members = [m for m, b in ads.items() if b.B is a.B]
        want = sum(b.scale * stats.gradients[m].double() @ b.A[: b.rank].double().T
                   for m, b in ((m, ads[m]) for m in members))  # fmt: skip
        assert torch.allclose(a.B.grad.double()[:, : a.rank], want, rtol=1e-4, atol=1e-8)


def test_lori_without_gradients_is_one_clear_error():
    model = tiny_llama()
    stats = probed(model)
    plan = lori_plan(stats)
    bare = el.GradientStats.from_gradients(stats.gradients, keep_gradients=False)
    for given in (None, bare):
        with pytest.raises(ValueError) as e:
            el.apply(model, plan, stats=given)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("E²LoRI masks B by calibration magnitudes")
        assert "plan.options['mask'] = 'random'" in msg
        assert not adapted_modules(model)  # the model was left as it was


def test_lori_random_mask_option():
    model = tiny_llama()
    plan = lori_plan(probed(model))
    plan.options["mask"] = "random"
    el.apply(model, plan, seed=0)  # no statistics needed
    for a in lori_adapters(model).values():
        assert int(a.mask.sum()) == lori_kept(a.mask.numel(), 0.75)
    plan.options["mask"] = "top"
    with pytest.raises(ValueError, match="plan option mask must be one of magnitude, random"):
        el.apply(tiny_llama(), plan)


def test_lori_mask_saved_loaded_and_exported(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    stats = probed(model)
    el.apply(model, lori_plan(stats), stats=stats, seed=3)
    perturb(model)
    want = outputs(model)
    el.save(model, tmp_path / "a")
    loaded = el.load(tiny_llama(), tmp_path / "a")  # no statistics: the saved masks come back
    for n, a in lori_adapters(loaded).items():
        assert torch.equal(a.mask, lori_adapters(model)[n].mask)
    assert torch.allclose(outputs(loaded), want, atol=1e-6)
    el.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft"))
    assert torch.allclose(outputs(peft_model), want, atol=1e-5)


# -- E²VeRA ----------
def test_vera_matches_peft_vera():
    """Same seed as peft's ``projection_prng_key``: identical frozen A, B (peft's Kaiming init,
    bound √(6/fan_in)); with peft's λ_d, λ_b set to our d (zero past r_k) and b, identical
    outputs — so no α/r factor. Init: d = 0.1 (peft's d_initial), b = 0."""
    from peft import VeraConfig, get_peft_model

    base = tiny_llama()
    stats = el.probe(base, lm_batches(2, seed=1), ["q_proj"], steps=2, progress=False)
    plan = el.plan_e2vera(stats, r=4)
    model = el.apply(tiny_llama(), plan, seed=11)
    ads: dict[str, VeRAAdapter] = {n: w.adapter for n, w in adapted_modules(model).items()}
    big = max(m.rank for m in plan.modules.values())
    for a in ads.values():
        assert a.scale == 1.0
        assert torch.equal(a.d, torch.full_like(a.d, 0.1)) and not a.b.any()
    perturb(model)
    peft_model = get_peft_model(
        tiny_llama(),
        VeraConfig(r=big, target_modules=["q_proj"], projection_prng_key=11, d_initial=0.1),
    )
    first = next(iter(ads.values()))
    assert torch.equal(peft_model.base_model.vera_A["default"], first.A)
    assert torch.equal(peft_model.base_model.vera_B["default"], first.B)
    with torch.no_grad():
        for n, a in ads.items():
            layer = peft_model.base_model.model.get_submodule(n)
            d = torch.zeros(big)
            d[: a.rank] = a.d[: a.rank]
            layer.vera_lambda_d["default"].copy_(d)
            layer.vera_lambda_b["default"].copy_(a.b)
    assert torch.allclose(outputs(peft_model), outputs(model), atol=1e-6)


def test_vera_frozen_bounds_and_delta_against_numpy():
    base = tiny_llama(hidden=64)
    stats = el.probe(base, lm_batches(2, seed=1), TARGETS, steps=2, progress=False)
    model = el.apply(tiny_llama(hidden=64), el.plan_e2vera(stats, r=4), seed=2)
    perturb(model)
    for a in (w.adapter for w in adapted_modules(model).values()):
        R = a.A.shape[0]
        for t, fan in ((a.A, a.d_in), (a.B, R)):
            bound = np.sqrt(6 / fan)
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
        r = a.rank
        A, B = a.A.double().numpy(), a.B.double().numpy()
        d, b = a.d.detach().double().numpy(), a.b.detach().double().numpy()
        want = np.diag(b) @ B[:, :r] @ np.diag(d[:r]) @ A[:r]  # VeRA eq. 2, no α/r
        assert np.allclose(a.delta_weight().detach().double().numpy(), want, atol=1e-6)


def test_vera_peft_export_reproduces(tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    stats = el.probe(base, lm_batches(2, seed=1), TARGETS, steps=2, progress=False)
    model = el.apply(tiny_llama(), el.plan_e2vera(stats, r=4), seed=2)
    perturb(model)
    el.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft"))
    assert torch.allclose(outputs(peft_model), outputs(model), atol=1e-5)
