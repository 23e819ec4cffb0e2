"""RaLoRA, RaLoRA-Pro, LS-LoRA, LoRA+GID planners against a float64 reading of METHODS §4."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrolora as el
import reference_methods as ref
from entrolora.stats import GradientStats, ModuleStats

# Most statistics here are built without a noise estimate: the planners read them raw, warned.
pytestmark = pytest.mark.filterwarnings("ignore:these statistics hold no noise estimate")

Q = "model.layers.{}.self_attn.q_proj"


def spectrum_grad(d_out: int, d_in: int, sv: list[float], seed: int = 0) -> torch.Tensor:
    """A ``d_out × d_in`` matrix with exactly the singular values ``sv`` (random U, V)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    k = len(sv)
    return u[:, :k] @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ v[:, :k].T


def erank_stats(rows: list[tuple[int, int, float | None, float | None]]) -> GradientStats:
    """GradientStats from (d_out, d_in, erank, sensitivity) per layer; erank None → degenerate."""
    mods = {}
    for i, (d_out, d_in, g, s) in enumerate(rows):
        name = Q.format(i)
        mods[name] = ModuleStats(
            name=name, module_type=Q.replace("{}", "*"), layer=i, shape=(d_out, d_in),
            numel=d_out * d_in, mean=0.0, std=0.0 if g is None else 1e-3,
            entropy=None if g is None else -5.0, erank=g, sensitivity=s,
        )  # fmt: skip
    return GradientStats(modules=mods)


# -- RaLoRA block counts ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, r, n_max, d, expected",
    [
        (1, 4, 32, (64, 64), 1),  # erank 1 < r: one block
        (8, 4, 32, (64, 64), 2),  # erank 8 = 2r exactly: two blocks, not one
        (16, 4, 32, (64, 64), 4),
        (30, 4, 32, (64, 64), 4),  # floor(log2 7.5) = 2
        (32, 2, 32, (64, 64), 16),
        (32, 1, 8, (64, 64), 8),  # capped at n_max
        (32, 2, 32, (64, 48), 16),  # 16 divides 48
        (32, 1, 32, (64, 48), 16),  # wanted 32, 32 ∤ 48 → fallback 16
        (24, 2, 32, (24, 36), 4),  # wanted 8, 8 ∤ 36 → 4
    ],
)
def test_block_counts_on_prescribed_spectra(k, r, n_max, d, expected):
    d_out, d_in = d
    grads = {Q.format(0): spectrum_grad(d_out, d_in, [1.0] * k)}  # erank exactly k
    gnp = grads[Q.format(0)].double().numpy()
    assert ref.erank(gnp) == pytest.approx(k, rel=1e-6)
    stats = GradientStats.from_gradients(grads)
    p = el.plan_ralora(stats, r=r, n_max=n_max)
    m = p.modules[Q.format(0)]
    assert m.blocks == expected == ref.blocks(ref.erank(gnp), r, n_max, d_in, d_out)
    assert m.rank == r and p.options["n_max"] == n_max


def test_decaying_spectra_match_reference():
    rows = []
    grads = {}
    for i, decay in enumerate([0.0, 0.05, 0.2, 0.5, 1.0, 2.0]):
        sv = [math.exp(-decay * j) for j in range(32)]
        grads[Q.format(i)] = spectrum_grad(32, 64, sv, seed=i)
        rows.append(grads[Q.format(i)].double().numpy())
    stats = GradientStats.from_gradients(grads)
    p = el.plan_ralora(stats, r=2, n_max=16)
    for i, g in enumerate(rows):
        assert stats[Q.format(i)].erank == pytest.approx(ref.erank(g), rel=1e-2)
        assert p.modules[Q.format(i)].blocks == ref.blocks(ref.erank(g), 2, 16, 64, 32)
    assert len({m.blocks for m in p.modules.values()}) >= 3  # the spectra do spread the counts


def test_ralora_degenerate_gets_one_block():
    p = el.plan_ralora(erank_stats([(16, 16, None, None), (16, 16, 16.0, None)]), r=2)
    assert [m.blocks for m in p.modules.values()] == [1, 8]
    assert p.options["eranks"][Q.format(0)] is None
    assert p.options["blocks_wanted"] == {Q.format(0): 1, Q.format(1): 8}


@pytest.mark.parametrize("n_max", [0, 3, 12, 2.0])
def test_n_max_power_of_two(n_max):
    with pytest.raises(ValueError, match="n_max must be"):
        el.plan_ralora(erank_stats([(16, 16, 4.0, None)]), n_max=n_max)


def test_ralora_count_is_blocks_free():
    stats = erank_stats([(16, 32, 16.0, None), (16, 32, 2.0, None)])
    p = el.plan_ralora(stats, r=2)
    assert [m.blocks for m in p.modules.values()] == [8, 1]
    assert p.num_trainable_params() == 2 * 2 * (16 + 32)
    assert p.max_rank == 16


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([8, 12, 16, 24, 48, 64, 96]),
            st.sampled_from([8, 12, 16, 24, 48, 64, 96]),
            st.one_of(st.none(), st.floats(1.0, 96.0)),
        ),
        min_size=1,
        max_size=6,
    ),
    r=st.integers(1, 16),
    n_max=st.sampled_from([1, 2, 4, 8, 16, 32, 64]),
)
def test_block_properties(rows, r, n_max):
    stats = erank_stats([(o, i, g, None) for o, i, g in rows])
    p = el.plan_ralora(stats, r=r, n_max=n_max)
    for (d_out, d_in, g), m in zip(rows, p.modules.values()):
        n = m.blocks
        assert n >= 1 and n & (n - 1) == 0 and n <= n_max
        assert d_in % n == 0 and d_out % n == 0
        assert n == ref.blocks(g, r, n_max, d_in, d_out)
    assert el.plan_ralora(stats, r=r, n_max=n_max) == p
    assert el.AdaptationPlan.from_dict(json.loads(p.to_json())) == p


# -- RaLoRA-Pro and LS-LoRA ---------------------------------------------------------------------
def pro_rows():
    return [
        (16, 16, 16.0, 1e-5),
        (16, 16, 4.0, 2e-5),
        (32, 16, 30.0, 8e-5),
        (16, 32, 2.0, 1e-7),
        (32, 32, 32.0, 5e-4),
    ]


def test_ralora_pro_matches_reference():
    rows = pro_rows()
    stats = erank_stats(rows)
    for r_ref, r_min, r_max in [(8, None, None), (4, 1, 64), (6, 5, 7)]:
        p = el.plan_ralora_pro(stats, r_ref=r_ref, r_min=r_min, r_max=r_max, n_max=8)
        lo = max(1, r_ref // 2) if r_min is None else r_min
        hi = 2 * r_ref if r_max is None else r_max
        ranks = ref.pro_ranks([s for *_, s in rows], [(i, o) for o, i, *_ in rows], r_ref, lo, hi)
        got = [m.rank for m in p.modules.values()]
        assert got == ranks
        assert all(lo <= x <= hi for x in got)  # clamped to [r_min, r_max]
        for (o, i, g, _), m, rk in zip(rows, p.modules.values(), ranks):
            assert m.blocks == ref.blocks(g, rk, 8, i, o)
        assert (p.options["r_min"], p.options["r_max"]) == (lo, hi)
    # the extremes really are clamped: the least sensitive module sits at r_min
    p = el.plan_ralora_pro(stats, r_ref=8)
    assert p.modules[Q.format(3)].rank == 4 and p.modules[Q.format(4)].rank == 16
    assert (
        p.options["unclamped_ranks"][Q.format(3)]
        < 4
        < 16
        < p.options["unclamped_ranks"][Q.format(4)]
    )


def test_ralora_pro_from_gradients_and_weights():
    g = torch.Generator().manual_seed(0)
    grads = {Q.format(i): torch.randn(8, 16, generator=g) * (i + 1) for i in range(4)}
    weights = {n: torch.randn(8, 16, generator=g) for n in grads}
    stats = GradientStats.from_gradients(grads, weights)
    sens = [ref.sensitivity(weights[n].numpy(), grads[n].numpy()) for n in grads]
    p = el.plan_ralora_pro(stats, r_ref=4, r_min=1, r_max=32)
    assert [m.rank for m in p.modules.values()] == ref.pro_ranks(sens, [(16, 8)] * 4, 4, 1, 32)


def test_ralora_pro_uniform_sensitivity_gives_r_ref():
    stats = erank_stats([(16, 16, 4.0, 1e-3), (16, 16, 4.0, 1e-3), (16, 16, 4.0, 1e-3)])
    assert [m.rank for m in el.plan_ralora_pro(stats, r_ref=6).modules.values()] == [6, 6, 6]


def test_ls_lora_has_pro_ranks_and_one_block():
    stats = erank_stats(pro_rows())
    pro = el.plan_ralora_pro(stats, r_ref=8)
    ls = el.plan_ls_lora(stats, r_ref=8)
    assert [m.rank for m in ls.modules.values()] == [m.rank for m in pro.modules.values()]
    assert {m.blocks for m in ls.modules.values()} == {1}
    assert {m.blocks for m in pro.modules.values()} != {1}


def test_pro_needs_sensitivity():
    stats = erank_stats([(16, 16, 4.0, None)])
    with pytest.raises(ValueError, match="need loss sensitivity"):
        el.plan_ralora_pro(stats)
    with pytest.raises(ValueError, match="need loss sensitivity"):
        el.plan_ls_lora(stats)


def test_pro_zero_sensitivity():
    with pytest.raises(ValueError, match="every module has zero loss sensitivity"):
        el.plan_ralora_pro(erank_stats([(16, 16, None, 0.0)]))


def test_pro_r_min_above_r_max():
    with pytest.raises(ValueError, match=r"r_min \(9\) must be ≤ r_max \(8\)"):
        el.plan_ralora_pro(erank_stats(pro_rows()), r_min=9, r_max=8)


def test_pro_bad_r_ref():
    with pytest.raises(ValueError, match="r_ref must be an integer ≥ 1"):
        el.plan_ls_lora(erank_stats(pro_rows()), r_ref=0)


def test_pro_degenerate_module_gets_r_min():
    rows = [*pro_rows(), (16, 16, None, 0.0)]
    p = el.plan_ralora_pro(erank_stats(rows), r_ref=8)
    m = p.modules[Q.format(5)]
    assert m.rank == 4 and m.blocks == 1


# -- LoRA+GID -------------------------------------------------------------------------------------
def test_lora_gid_ranks():
    rows = [(16, 16, 2.5, None), (16, 16, 3.5, None), (16, 16, 0.4, None), (16, 16, None, None),
            (16, 16, 11.2, None)]  # fmt: skip
    p = el.plan_lora_gid(erank_stats(rows))
    # round half to even: 2.5 → 2, 3.5 → 4; below 1 → 1; degenerate → 1
    assert [m.rank for m in p.modules.values()] == [2, 4, 1, 1, 11]
    assert {m.blocks for m in p.modules.values()} == {1}
    assert p.lora_alpha == 16.0


def test_gradient_planners_refuse_a_model():
    from tiny import tiny_llama

    model = tiny_llama(layers=2)
    for method in ("ralora", "ralora_pro", "ls_lora", "lora_gid"):
        with pytest.raises(ValueError, match="probe first"):
            el.plan(method, model)


def test_numbers_are_float64_reference_agnostic():
    # the planner's erank (Gram eigenvalues) against numpy's SVD on an ill-conditioned matrix
    sv = [10.0 ** (-j / 3) for j in range(24)]
    g = spectrum_grad(24, 40, sv, seed=3)
    stats = GradientStats.from_gradients({Q.format(0): g})
    assert stats[Q.format(0)].erank == pytest.approx(ref.erank(g.numpy()), rel=1e-2)
    assert np.isfinite(stats[Q.format(0)].erank)


def test_signal_statistics_read_the_signal_effective_rank():
    # G = μ + e with μ of effective rank 8 (r = 2 → 4 blocks); the raw erank reads the noise
    # into it (17.5 → 8 blocks), the signal erank half as much (12.4, still 4 blocks)
    mu = spectrum_grad(64, 64, [1.0] * 8, seed=4)
    g = torch.Generator().manual_seed(5)
    e, d = (torch.randn(64, 64, generator=g, dtype=torch.float64) * 0.005 for _ in "ed")
    stats = GradientStats.from_halves({Q.format(0): mu + e + d}, {Q.format(0): mu + e - d})
    s = stats[Q.format(0)]
    for method, kw in (("ralora", {"r": 2}), ("ralora_pro", {"r_ref": 2}), ("lora_gid", {})):
        if method == "ralora_pro":
            stats = GradientStats.from_halves(
                {Q.format(0): mu + e + d}, {Q.format(0): mu + e - d}, {Q.format(0): mu}
            )
        signal, raw = el.plan(method, stats, **kw), el.plan(method, stats, statistics="raw", **kw)
        assert signal.options["statistics"] == "signal" and raw.options["statistics"] == "raw"
        assert signal.options["eranks"][Q.format(0)] == s.signal_erank
        assert raw.options["eranks"][Q.format(0)] == s.erank
    assert el.plan_ralora(stats, r=2).modules[Q.format(0)].blocks == 4
    assert el.plan_ralora(stats, r=2, statistics="raw").modules[Q.format(0)].blocks == 8
