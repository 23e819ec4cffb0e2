"""Adapter modules (entrolora.adapters) and the table of adapter kinds shared by the other tests.

``CASES`` maps a case name to a plan builder, peft-style: every kind (plain, shared intervals,
E²ShareLoRA slice, block-diagonal n=2/4, DoRA, VeRA, LoRI) runs through the shared checks in
test_inject.py, test_io.py and test_export_peft.py. ``numpy_delta`` recomputes each adapter's
ΔW in float64 numpy from its raw tensors, independently of the adapter code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import entrolora as el
from entrolora.adapters import (
    AdaptedLinear,
    Adapter,
    BlockDiagonalAdapter,
    DoRAAdapter,
    LoRIAdapter,
    LowRankAdapter,
    VeRAAdapter,
    kaiming_uniform,
)
from entrolora.adapters.inject import adapted_modules
from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan, lori_kept
from tiny import tiny_bert, tiny_gpt2, tiny_llama

ALPHA = 6.0
MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"]),
    "bert": (tiny_bert, ["query", "value"]),
}
INTERVALS = ((0, 1), (2, 3))  # two sharing intervals of a 4-layer model
INTERVAL_RANKS = (2, 3)  # different ranks, so E²ShareLoRA members slice the type-wide A


def _targets(model, patterns):
    return el.find_targets(model, patterns)


def _module(t, rank, **kw) -> ModulePlan:
    return ModulePlan(rank=rank, d_in=t.d_in, d_out=t.d_out, module_type=t.module_type,
                      layer=t.layer, **kw)  # fmt: skip


def _by_type(targets):
    out: dict[str, list] = {}
    for t in targets.values():
        out.setdefault(t.module_type, []).append(t)
    return out


def plan_plain(targets, blocks=1, kind="lora", sparsity=None) -> AdaptationPlan:
    """Per-module adapters, ranks 2 and 3 alternating (no sharing)."""
    mods = {
        n: _module(t, 2 + (t.layer % 2), kind=kind, blocks=blocks, sparsity=sparsity)
        for n, t in targets.items()
    }
    return AdaptationPlan("plain", mods, lora_alpha=ALPHA)


def plan_intervals(targets, kind="lora", factors=("A", "B"), sparsity=None) -> AdaptationPlan:
    """E²LoRA-like: every interval of every type shares ``factors``; interval ranks differ."""
    mods, groups = {}, {}
    for mtype, ts in _by_type(targets).items():
        for k, (s, e) in enumerate(INTERVALS):
            gid = f"{mtype}:{k}"
            members = [t for t in ts if s <= t.layer <= e]
            r = INTERVAL_RANKS[k]
            groups[gid] = GroupPlan(tuple(t.name for t in members), tuple(factors), r, mtype)
            for t in members:
                shared = dict.fromkeys(factors, gid)
                mods[t.name] = _module(t, r, kind=kind, group=gid, shared=shared, sparsity=sparsity)
    return AdaptationPlan(f"e2{kind}", mods, groups, lora_alpha=ALPHA)


def plan_typewide(targets, kind="lora", type_factors=("A",), interval_factors=("B",)):
    """E²ShareLoRA (A per type at max rank, B per interval) / E²VeRA (A, B per type; d, b)."""
    mods, groups = {}, {}
    for mtype, ts in _by_type(targets).items():
        tid = f"{mtype}:type"
        groups[tid] = GroupPlan(tuple(t.name for t in ts), type_factors, max(INTERVAL_RANKS), mtype)
        for k, (s, e) in enumerate(INTERVALS):
            gid = f"{mtype}:{k}"
            members = [t for t in ts if s <= t.layer <= e]
            r = INTERVAL_RANKS[k]
            groups[gid] = GroupPlan(tuple(t.name for t in members), interval_factors, r, mtype)
            for t in members:
                shared = {
                    **dict.fromkeys(type_factors, tid),
                    **dict.fromkeys(interval_factors, gid),
                }
                mods[t.name] = _module(t, r, kind=kind, group=gid, shared=shared)
    return AdaptationPlan(f"e2{kind}", mods, groups, lora_alpha=ALPHA)


CASES = {
    "plain": lambda t: plan_plain(t),
    "intervals": lambda t: plan_intervals(t),
    "sharelora_slice": lambda t: plan_typewide(t),
    "blocks2": lambda t: plan_plain(t, blocks=2),
    "blocks4": lambda t: plan_plain(t, blocks=4),
    "dora": lambda t: plan_intervals(t, kind="dora"),
    "vera": lambda t: plan_typewide(t, "vera", ("A", "B"), ("d", "b")),
    "lori": lambda t: random_lori_masks(plan_intervals(t, kind="lori", sparsity=0.5)),
}


def random_lori_masks(plan: AdaptationPlan) -> AdaptationPlan:
    """Seeded random LoRI masks: these cases have no probe (tests/test_variants.py checks the
    default, calibration-magnitude masks)."""
    plan.options["mask"] = "random"
    return plan


def build(case: str, model_name: str = "llama", seed: int = 0, randomize: bool = True):
    """A tiny 4-layer model with the case's adapters applied; random nonzero trainable factors."""
    factory, patterns = MODELS[model_name]
    model = factory(layers=4, seed=0)
    plan = CASES[case](_targets(model, patterns))
    el.apply(model, plan, seed=seed)
    if randomize:
        randomize_(model, seed)
    return model, plan


@torch.no_grad()
def randomize_(model, seed: int = 0) -> None:
    """Random values in every trainable adapter tensor (B is zero at init: tests would be void)."""
    g = torch.Generator().manual_seed(1000 + seed)
    for p in el.trainable_parameters(model):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 0.05)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def numpy_weight(layer: nn.Module) -> np.ndarray:
    """The base weight as (d_out, d_in) float64 (Conv1D transposed)."""
    w = _np(layer.weight)
    return w.T if type(layer).__name__ == "Conv1D" else w


def numpy_delta(adapter: nn.Module, alpha: float, rank: int, w: np.ndarray) -> np.ndarray:
    """ΔW (d_out, d_in) in float64 numpy from the raw stored tensors; W the base weight."""
    s = alpha / rank
    if isinstance(adapter, BlockDiagonalAdapter):
        a, b = _np(adapter.A)[:, :rank], _np(adapter.B)[:, :, :rank]
        n, _, k = a.shape
        o = b.shape[1]
        out = np.zeros((n * o, n * k))
        for i in range(n):  # the reference loops; the adapter must not
            out[i * o : (i + 1) * o, i * k : (i + 1) * k] = s * b[i] @ a[i]
        return out
    if isinstance(adapter, VeRAAdapter):
        a, b = _np(adapter.A)[:rank], _np(adapter.B)[:, :rank]
        d, bb = _np(adapter.d)[:rank], _np(adapter.b)
        return (bb[:, None] * b) @ (d[:, None] * a)  # VeRA eq. 2: no α/r factor
    if isinstance(adapter, LoRIAdapter):
        b = _np(adapter.B) * adapter.mask.cpu().numpy()
        return s * b[:, :rank] @ _np(adapter.A)[:rank]
    lora = s * _np(adapter.B)[:, :rank] @ _np(adapter.A)[:rank]
    if isinstance(adapter, DoRAAdapter):
        v = w + lora
        m = _np(adapter.magnitude)
        return m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True) - w
    return lora


# -- protocol and adapters -------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_adapter_follows_the_protocol(case):
    model, plan = build(case)
    for name, wrapper in adapted_modules(model).items():
        a = wrapper.adapter
        assert isinstance(a, Adapter)
        m = plan.modules[name]
        # each adapter holds α / its own rank; VeRA has no such factor (VeRA eq. 2, peft)
        assert a.scale == (1.0 if m.kind == "vera" else ALPHA / m.rank)
        w = numpy_weight(wrapper.base_layer)
        np.testing.assert_allclose(
            _np(a.delta_weight()), numpy_delta(a, ALPHA, m.rank, w), rtol=1e-5, atol=1e-6
        )
        A, B, scale = a.lora_factors()
        assert A.shape == (m.rank * m.blocks, m.d_in) and B.shape == (m.d_out, m.rank * m.blocks)
        if not isinstance(a, DoRAAdapter):  # DoRA's factors are its direction, ΔW adds magnitude
            torch.testing.assert_close(scale * B @ A, a.delta_weight(), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.sampled_from([1, 2, 4, 8]),
    rank=st.integers(1, 4),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    seed=st.integers(0, 1000),
)
def test_block_diagonal_any_leading_shape(blocks, rank, lead, seed):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 16, 24
    A = torch.randn(blocks, rank + 1, d_in // blocks, generator=g)
    B = torch.randn(blocks, d_out // blocks, rank + 1, generator=g)
    adapter = BlockDiagonalAdapter(A, B, rank, scale=1.5)
    x = torch.randn(*lead, d_in, generator=g)
    y = adapter(x)
    assert y.shape == (*lead, d_out)
    dense = numpy_delta(adapter, 1.5 * rank, rank, np.zeros((d_out, d_in)))
    np.testing.assert_allclose(_np(y), _np(x) @ dense.T, rtol=1e-5, atol=1e-5)


def test_block_diagonal_materialised_factors_are_block_diagonal():
    A, B = torch.randn(4, 2, 3), torch.randn(4, 5, 2)
    a, b, _ = BlockDiagonalAdapter(A, B, 2, 1.0).lora_factors()
    assert a.shape == (8, 12) and b.shape == (20, 8)
    np.testing.assert_array_equal(_np(a[2:4, 3:6]), _np(A[1]))
    np.testing.assert_array_equal(_np(b[5:10, 2:4]), _np(B[1]))
    assert a[0:2, 3:].abs().sum() == 0 and b[:5, 2:].abs().sum() == 0


def test_kaiming_uniform_matches_peft_init_bound():
    g = torch.Generator().manual_seed(0)
    a = kaiming_uniform((64, 400), 400, g)
    ref = torch.empty(64, 400)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5))  # peft's LoRA A init
    bound = 1 / math.sqrt(400)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert ref.abs().max() <= bound + 1e-7
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_init_b_zero_and_outputs_unchanged():
    for case in CASES:
        model, _ = build(case, randomize=False)
        for wrapper in adapted_modules(model).values():
            a = wrapper.adapter
            if isinstance(a, VeRAAdapter):
                assert (a.b == 0).all() and torch.allclose(a.d, torch.full_like(a.d, 0.1))
            else:
                assert (a.B == 0).all(), case
            if isinstance(a, LowRankAdapter | BlockDiagonalAdapter):
                bound = 1 / math.sqrt(a.A.shape[-1])
                assert 0 < a.A.abs().max() <= bound
            assert a.delta_weight().abs().max() < 1e-6, case


def test_dora_magnitude_is_row_norm_of_base_weight():
    model, _ = build("dora", randomize=False)
    for wrapper in adapted_modules(model).values():
        w = numpy_weight(wrapper.base_layer)
        np.testing.assert_allclose(
            _np(wrapper.adapter.magnitude), np.linalg.norm(w, axis=1), rtol=1e-6
        )


def test_lori_mask_keeps_exact_count_and_blocks_gradients():
    model, plan = build("lori")
    for wrapper in adapted_modules(model).values():
        a = wrapper.adapter
        assert int(a.mask.sum()) == lori_kept(a.mask.numel(), 0.5)
    x = torch.randint(1, 90, (2, 8))
    model(x).logits.square().mean().backward()
    for wrapper in adapted_modules(model).values():
        a = wrapper.adapter
        assert (a.B.grad[~a.mask] == 0).all()
        assert a.B.grad[a.mask].abs().sum() > 0
        assert not a.A.requires_grad and "A" in dict(a.named_buffers())


def test_vera_frozen_matrices_are_shared_buffers():
    model, _ = build("vera")
    adapters = [w.adapter for n, w in adapted_modules(model).items() if "q_proj" in n]
    assert all(a.A is adapters[0].A and a.B is adapters[0].B for a in adapters)
    assert all(not a.A.requires_grad for a in adapters)
    assert {"A", "B"} <= set(dict(adapters[0].named_buffers()))


def test_adapters_default_to_float32_and_adapter_dtype_overrides():
    model = tiny_llama(layers=4).to(torch.bfloat16)
    plan = CASES["blocks2"](_targets(model, ["q_proj", "v_proj"]))
    el.apply(model, plan)
    for w in adapted_modules(model).values():
        assert w.adapter.A.dtype == torch.float32  # as peft (tests/test_adapter_dtype.py)
    model = tiny_llama(layers=4).to(torch.bfloat16)
    el.apply(model, plan, adapter_dtype=torch.bfloat16)
    wrapper = next(iter(adapted_modules(model).values()))
    assert wrapper.adapter.A.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    assert wrapper(x).dtype == torch.bfloat16


def test_dropout_applies_only_to_the_adapter_input():
    lin = nn.Linear(8, 4)
    A, B = nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(4, 2))
    wrapper = AdaptedLinear(lin, LowRankAdapter(A, B, 2, 1.0), dropout=0.5).train()
    x = torch.randn(64, 8)
    torch.manual_seed(0)
    y = wrapper(x)
    torch.manual_seed(0)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, lin(x) + dropped @ A.T @ B.T)
    wrapper.eval()
    torch.testing.assert_close(wrapper(x), lin(x) + x @ A.T @ B.T)


def test_bad_adapter_inputs():
    with pytest.raises(ValueError, match="dropout must be in"):
        AdaptedLinear(
            nn.Linear(4, 4), LowRankAdapter(torch.zeros(1, 4), torch.zeros(4, 1), 1, 1), 1.0
        )
    with pytest.raises(ValueError, match="LowRankAdapter needs A"):
        LowRankAdapter(torch.zeros(1, 4), torch.zeros(4, 1), 2, 1.0)
    with pytest.raises(ValueError, match="same block count"):
        BlockDiagonalAdapter(torch.zeros(2, 1, 4), torch.zeros(4, 2, 1), 1, 1.0)
    with pytest.raises(ValueError, match="LoRI mask must be a bool"):
        LoRIAdapter(torch.zeros(1, 4), torch.zeros(4, 1), torch.zeros(4, 1), 1, 1.0)


def test_models_cover_conv1d_and_bert():
    for name in ("gpt2", "bert"):
        model, _ = build("plain", name)
        assert adapted_modules(model)
