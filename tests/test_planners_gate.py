"""E²LoRA's significance-gated partition (issue 33): boundaries="significant" vs "greedy"."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entrolora as el
from entrolora.planners.e2lora import gated_intervals, greedy_intervals
from entrolora.stats import GradientStats

Q = "model.layers.{}.self_attn.q_proj"
QT = "model.layers.*.self_attn.q_proj"


def halves_stats(stds: list[float], noise: float = 0.2, seed: int = 0) -> GradientStats:
    """Statistics of one type from two halves (signal σ per layer, noise ``noise``·σ)."""
    g = torch.Generator().manual_seed(seed)
    first, second = {}, {}
    for i, sd in enumerate(stds):
        mu = torch.randn(16, 24, generator=g, dtype=torch.float64) * sd
        e, d = (torch.randn(16, 24, generator=g, dtype=torch.float64) * sd * noise for _ in "ed")
        first[Q.format(i)], second[Q.format(i)] = mu + e + d, mu + e - d
    return GradientStats.from_halves(first, second, counts=(8, 8))


def with_noise(stats: GradientStats, scale: float) -> GradientStats:
    """``stats`` with a moment covariance ``scale``² times each moment's own size² (diagonal)."""
    cov = {}
    for t, names in stats.types.items():
        mods = [stats.modules[n] for n in names]
        m2 = [m.std**2 + m.mean**2 for m in mods]
        size = [math.sqrt(v) for v in m2] + m2  # a mean's size: its rms; m₂'s: itself
        cov[t] = torch.diag(torch.tensor(size, dtype=torch.float64) * scale).square().tolist()
    return replace(stats, moment_cov=cov)


STDS = [1e-3, 1.1e-3, 0.9e-3, 2e-3, 2.2e-3, 1.9e-3, 0.5e-3, 0.55e-3]


def test_zero_noise_is_greedy():
    stats = with_noise(halves_stats(STDS), 0.0)
    gated = el.plan_e2lora(stats, r=4)
    greedy = el.plan_e2lora(stats, r=4, boundaries="greedy")
    assert gated.options["boundaries"] == "significant"
    assert greedy.options["boundaries"] == "greedy"
    t_g, t_p = gated.options["types"][QT], greedy.options["types"][QT]
    assert t_g["intervals"] == t_p["intervals"] and len(t_p["intervals"]) > 1
    assert t_g["undecided"] == 0 and t_g["decide_steps"] is None
    assert "undecided" not in t_p


def test_huge_noise_is_one_interval():
    stats = with_noise(halves_stats(STDS), 1e3)
    plan = el.plan_e2lora(stats, r=4)
    t = plan.options["types"][QT]
    assert t["intervals"] == [[0, len(STDS) - 1]]
    assert t["undecided"] == len(STDS) - 1  # every decision of the one chain was undecided
    assert t["decide_steps"] > 16 * 1e4  # S·(z·sd/|m|)² with sd ≫ |m|
    assert "undecided" in plan.summary()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.floats(0.3, 3.0), min_size=2, max_size=7),
    st.floats(0.0, 0.05),
    st.floats(0.0, 4.0),
)
def test_gate_only_merges(stds, scale, z):
    """Every boundary of the gated chain is a boundary of the greedy chain's cut at that start:
    the gate never splits where greedy merges; with z = 0 it is greedy."""
    stats = with_noise(halves_stats([s * 1e-3 for s in stds]), scale)
    sim = stats.similarity(QT, statistics="signal").numpy().tolist()
    from entrolora.stats.margin_noise import margin_sd

    sd = margin_sd(stats, QT).numpy().tolist()
    deg = [False] * len(stds)
    gated, _, undecided = gated_intervals(sim, deg, sd, z)
    assert gated_intervals(sim, deg, sd, 0.0)[0] == greedy_intervals(sim, deg)[0]
    for s, e in gated:  # inside an interval every step merged: above threshold or undecided
        for c in range(s + 1, e + 1):
            tau = (sum(sim[s]) - sim[s][s]) / (len(sim) - 1)
            assert sim[c][s] >= tau - 1e-9 * max(1, abs(tau)) or any(
                u.start == s and u.candidate == c for u in undecided
            )
    assert len(gated) <= len(greedy_intervals(sim, deg)[0]) or undecided


def test_margin_just_below_threshold_merges_iff_within_z_sd():
    # three layers; row 0's mean off-diagonal is τ_0 = (0.9 + 0.8)/2 = 0.85; sim[1][0] = 0.9 ≥ τ
    # merges; sim[2][0] = 0.8 is 0.05 below τ_0
    sim = [[1.0, 0.9, 0.8], [0.9, 1.0, 0.7], [0.8, 0.7, 1.0]]
    deg = [False] * 3
    assert greedy_intervals(sim, deg)[0] == [(0, 1), (2, 2)]
    for sd, merged in ((0.03, True), (0.026, True), (0.024, False), (0.02, False)):
        sds = [[sd] * 3 for _ in range(3)]
        intervals, _, undecided = gated_intervals(sim, deg, sds, z=2.0)
        assert intervals == ([(0, 2)] if merged else [(0, 1), (2, 2)]), (sd, intervals)
        # the first decision (margin +0.05) is within 2 sd too when sd > 0.025: undecided, merged
        assert any(u.candidate == 2 for u in undecided) == merged
        if merged:
            assert undecided[-1].start == 0 and undecided[-1].candidate == 2
            assert undecided[-1].margin == pytest.approx(-0.05)


def test_without_moment_noise_falls_back_with_one_warning():
    stats = halves_stats(STDS)  # a noise estimate, but no moment covariance (pre-issue-33 file)
    with pytest.warns(UserWarning, match="boundaries='significant' falls back"):
        plan = el.plan_e2lora(stats, r=4)
    assert plan.options["boundaries"] == "greedy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        el.plan_e2lora(stats, r=4)  # once per statistics object
        el.plan_e2lora(stats, r=4, boundaries="greedy")


def test_bad_boundaries_and_z():
    stats = with_noise(halves_stats(STDS), 0.0)
    with pytest.raises(ValueError, match="boundaries must be one of"):
        el.plan_e2lora(stats, boundaries="sure")
    with pytest.raises(ValueError, match=r"z must be a finite number in \[0.0, inf\)"):
        el.plan_e2lora(stats, z=-1)
