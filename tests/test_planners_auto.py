"""The auto planner (METHODS.md §7) against independent float64 numpy: the literal greedy, the
divisible relaxation, the budget forms, bad inputs, and a plan that applies and exports."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entrolora as el
from entrolora.adapters.inject import num_trainable_params
from entrolora.planners.auto import resolve_budget
from entrolora.stats import GradientStats, ModuleStats
from tiny import lm_batches, tiny_llama

TYPES = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")


def module(name: str, t: str, layer: int, d_out: int, d_in: int, sv, raw=None) -> ModuleStats:
    """ModuleStats with a given signal spectrum (None: a degenerate module)."""
    live = sv is not None
    return ModuleStats(
        name=name, module_type=f"model.layers.*.{t}", layer=layer, shape=(d_out, d_in),
        numel=d_out * d_in, mean=0.0, std=1e-3 if live else 0.0,
        entropy=-5.0 if live else None, erank=2.0 if live else None, sensitivity=None,
        noise_mean=0.0, noise_std=1e-4, snr=1.0, signal_std=1e-3 if live else 0.0,
        signal_entropy=-5.0 if live else None, signal_erank=2.0 if live else None,
        spectrum=tuple(raw if raw is not None else sv) if live else None,
        signal_spectrum=tuple(sv) if live else None,
    )  # fmt: skip


def make_stats(rows, meta=None) -> GradientStats:
    """``rows``: (type, layer, d_out, d_in, signal singular values or None)."""
    mods = {}
    for t, layer, d_out, d_in, sv in rows:
        name = f"model.layers.{layer}.{t}"
        mods[name] = module(name, t, layer, d_out, d_in, sv)
    return GradientStats(modules=mods, steps=16, meta=dict(meta or {}))


# -- independent references ---------------------------------------------------------------------
def units(stats: GradientStats, power: int, r_max: int) -> dict[str, list[float]]:
    """{name: [v_1, v_2, ...]}: values of the buyable units (s > 0, within the caps)."""
    out = {}
    for n, m in stats.modules.items():
        if m.degenerate:
            continue
        cap = min(m.d_in, m.d_out, r_max)
        out[n] = [float(s) ** power for s in m.signal_spectrum[:cap] if s > 0]
    return out


def literal_greedy(stats: GradientStats, budget: int, power: int, r_max: int) -> dict[str, int]:
    """§7 word for word: repeatedly the unit of largest v/c that still fits; ties lower layer,
    then module name. O(units × modules)."""
    vals = units(stats, power, r_max)
    ranks = dict.fromkeys(vals, 0)
    left = budget
    while True:
        best = None
        for n, v in vals.items():
            m = stats[n]
            cost = m.d_in + m.d_out
            if ranks[n] >= len(v) or cost > left:
                continue
            key = (-v[ranks[n]] / cost, m.layer, n)
            if best is None or key < best[0]:
                best = (key, n, cost)
        if best is None:
            return {n: r for n, r in ranks.items() if r}
        ranks[best[1]] += 1
        left -= best[2]


def fractional_optimum(stats: GradientStats, budget: int, power: int, r_max: int) -> float:
    """Best value of the divisible relaxation (units bought in fractions), float64: the units
    by falling v/c, the last one in part."""
    vals = units(stats, power, r_max)
    v = np.array([x for vs in vals.values() for x in vs], dtype=np.float64)
    c = np.array([stats[n].d_in + stats[n].d_out for n, vs in vals.items() for _ in vs], float)
    order = np.argsort(-v / c, kind="stable")
    v, c = v[order], c[order]
    spent = np.concatenate([[0.0], np.cumsum(c)])
    full = int(np.searchsorted(spent, budget, side="right")) - 1  # units bought whole
    total = v[:full].sum()
    if full < len(v):
        total += v[full] * (budget - spent[full]) / c[full]
    return float(total)


# -- properties -----------------------------------------------------------------------------------
@st.composite
def problems(draw):
    layers = draw(st.integers(1, 4))
    types = draw(st.integers(1, 3))
    rows = []
    for t in TYPES[:types]:
        for layer in range(layers):
            d_out, d_in = draw(st.integers(2, 12)), draw(st.integers(2, 12))
            k = min(d_out, d_in)
            if draw(st.integers(0, 9)) == 0:
                rows.append((t, layer, d_out, d_in, None))
                continue
            sv = sorted(draw(st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k)), reverse=True)
            zeros = draw(st.integers(0, k))  # the signal's tail clipped at 0
            rows.append((t, layer, d_out, d_in, sv[: k - zeros] + [0.0] * zeros))
    power = draw(st.sampled_from((1, 2)))
    r_max = draw(st.integers(1, 8))
    budget = draw(st.integers(1, 1500))
    return make_stats(rows), power, r_max, budget


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_water_filling_properties(problem):
    stats, power, r_max, budget = problem
    vals = units(stats, power, r_max)
    cost = {n: stats[n].d_in + stats[n].d_out for n in vals}
    live = [n for n, v in vals.items() if v]
    if not live or budget < min(cost[n] for n in live):
        with pytest.raises(ValueError, match="smallest useful budget|no candidate module"):
            el.plan("auto", stats, budget=budget, power=power, r_max=r_max)
        return
    plan = el.plan("auto", stats, budget=budget, power=power, r_max=r_max)
    ranks = {n: m.rank for n, m in plan.modules.items()}
    spent = plan.num_trainable_params()
    # never above the budget, and the spent count is the plan's own
    assert spent == plan.options["spent"] <= budget == plan.options["budget"]
    # no rank for a degenerate module or a zero-signal unit; within the caps
    for n, r in ranks.items():
        assert not stats[n].degenerate and 1 <= r <= len(vals[n]) <= r_max
    # spent to within one unit of the cheapest module that still has a unit to buy
    open_costs = [cost[n] for n in live if ranks.get(n, 0) < len(vals[n])]
    if open_costs:
        assert budget - spent < min(open_costs)
    # exactly what the literal greedy buys
    assert ranks == literal_greedy(stats, budget, power, r_max)
    # the divisible relaxation's optimum bounds the value from above, within the one unit the
    # greedy could not fit (the next unit of some module)
    value = sum(sum(vals[n][:r]) for n, r in ranks.items())
    best = fractional_optimum(stats, budget, power, r_max)
    nxt = max((vals[n][ranks.get(n, 0)] for n in live if ranks.get(n, 0) < len(vals[n])), default=0)
    assert value <= best * (1 + 1e-12) + 1e-12
    assert best - value <= nxt * (1 + 1e-12) + 1e-12
    # the marginal value recorded is that of the last unit bought
    for n, r in ranks.items():
        assert plan.options["marginal"][n] == pytest.approx(vals[n][r - 1], rel=1e-12)


def test_a_known_allocation_with_ties():
    # cost 8 per unit everywhere; values 4,4,1 | 4,2 | 3 (power 1): ties at 4/8 go to layer 0
    # first, then by name within layer 0 (mlp before self_attn)
    rows = [
        ("self_attn.q_proj", 0, 4, 4, [4.0, 4.0, 1.0, 0.0]),
        ("mlp.up_proj", 0, 4, 4, [4.0, 2.0, 0.0, 0.0]),
        ("self_attn.q_proj", 1, 4, 4, [3.0, 0.0, 0.0, 0.0]),
        ("mlp.up_proj", 1, 4, 4, None),
    ]
    stats = make_stats(rows)
    plan = el.plan_auto(stats, budget=3 * 8 + 7)  # three units; 7 left, below any unit
    assert {n: m.rank for n, m in plan.modules.items()} == {
        "model.layers.0.mlp.up_proj": 1,
        "model.layers.0.self_attn.q_proj": 2,
    }
    assert plan.options["spent"] == 24 and plan.options["marginal"] == {
        "model.layers.0.mlp.up_proj": 4.0,
        "model.layers.0.self_attn.q_proj": 4.0,
    }
    # power 2 prices the same units by s²; everything with signal at a large budget, capped
    plan = el.plan_auto(stats, budget=10_000, power=2, r_max=2)
    assert {n: m.rank for n, m in plan.modules.items()} == {
        "model.layers.0.mlp.up_proj": 2,
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.self_attn.q_proj": 1,
    }
    assert plan.options["marginal"]["model.layers.0.mlp.up_proj"] == 4.0  # 2²


def test_a_unit_that_does_not_fit_is_skipped_and_cheaper_ones_still_bought():
    rows = [
        ("mlp.up_proj", 0, 10, 10, [10.0, 9.0] + [0.0] * 8),  # cost 20, ratios 0.5, 0.45
        ("self_attn.q_proj", 0, 2, 2, [1.0, 0.5]),  # cost 4, ratios 0.25, 0.125
    ]
    plan = el.plan_auto(make_stats(rows), budget=30)
    assert {n: m.rank for n, m in plan.modules.items()} == {
        "model.layers.0.mlp.up_proj": 1,
        "model.layers.0.self_attn.q_proj": 2,
    }


def test_plan_records_and_round_trips(tmp_path):
    stats = make_stats([("self_attn.q_proj", i, 8, 8, [2.0, 1.0] + [0.0] * 6) for i in range(3)])
    plan = el.plan("auto", stats, budget=48, init="gradient", lora_alpha=4)
    o = plan.options
    assert plan.method == "auto" and plan.lora_alpha == 4.0
    assert (o["budget"], o["spent"], o["power"], o["init"], o["r_max"]) == (
        48,
        48,
        1,
        "gradient",
        64,
    )
    assert o["target_modules"] == sorted(plan.modules) and o["candidate_count"] == 3
    back = el.AdaptationPlan.load(plan.save(tmp_path / "plan.json"))
    assert back == plan
    json.loads((tmp_path / "plan.json").read_text())  # plain JSON


def test_target_modules_narrow_the_candidates():
    rows = [(t, 0, 4, 4, [5.0, 1.0, 0, 0]) for t in TYPES]
    plan = el.plan_auto(make_stats(rows), budget=1000, target_modules=["q_proj"])
    assert list(plan.modules) == ["model.layers.0.self_attn.q_proj"]
    assert plan.options["candidates"] == ["q_proj"]


def test_raw_statistics_and_no_noise_estimate():
    raw = (9.0, 0.5, 0.1, 0.0)
    stats = make_stats([("self_attn.q_proj", 0, 4, 4, [1.0, 0, 0, 0])])
    name = "model.layers.0.self_attn.q_proj"
    from dataclasses import replace

    stats.modules[name] = replace(stats.modules[name], spectrum=raw)
    assert el.plan_auto(stats, budget=100).modules[name].rank == 1  # signal: one unit
    assert el.plan_auto(stats, budget=100, statistics="raw").modules[name].rank == 3
    stats.modules[name] = replace(stats.modules[name], noise_std=None, signal_spectrum=None)
    with pytest.warns(UserWarning, match="no noise estimate"):
        plan = el.plan_auto(stats, budget=100)
    assert plan.modules[name].rank == 3 and plan.options["statistics"] == "raw"


# -- budgets --------------------------------------------------------------------------------------
LLAMA = [
    (t, i, 16, 16, [1.0] * 16) for t in ("self_attn.q_proj", "self_attn.v_proj") for i in (0, 1)
]


def test_budget_forms():
    stats = make_stats(LLAMA, meta={"model_params": 10_000})
    assert resolve_budget(500, stats) == (500, None)
    assert resolve_budget("1e3", stats) == (1000, None)
    assert resolve_budget(2000.0, stats) == (2000, None)
    assert resolve_budget(0.05, stats) == (500, None)  # 5 % of 10,000
    assert resolve_budget("0.05", stats) == (500, None)
    # like-lora: LoRA's rank R on the named targets (2 q_proj modules: 2·32 per rank)
    assert resolve_budget("like-lora=4", stats, ["q_proj"]) == (4 * 64, 4)
    stats.meta["like_lora"] = {"targets": ["q_proj", "v_proj"], "params_per_rank": 1234}
    assert resolve_budget("like-lora=2", stats) == (2468, 2)
    assert resolve_budget("like_lora", stats) == (8 * 1234, 8)
    plan = el.plan_auto(stats)  # the default: like-lora=8, lora_alpha 2·8
    assert plan.options["budget"] == 8 * 1234 and plan.lora_alpha == 16.0
    assert el.plan_auto(stats, budget="like-lora=2").lora_alpha == 4.0


@pytest.mark.parametrize(
    "budget, message",
    [
        (0, "budget must be ≥ 1 parameter"),
        (-3, "budget must be ≥ 1 parameter"),
        (True, "budget must be a number or 'like-lora=R'"),
        (1.5, r"a float is a fraction of the model's parameters, in \(0, 1\)"),
        ("lots", "is not a parameter count, a fraction of the model or 'like-lora=R'"),
        ("like-lora=0", "like-lora rank must be an integer ≥ 1"),
        (0.1, "do not record the model's parameter count"),
        ("like-lora=8", "needs the family's default target modules"),
        (31, "the smallest useful budget is 32"),
    ],
)
def test_bad_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        el.plan_auto(make_stats(LLAMA), budget=budget)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"power": 3}, "power must be 1 or 2"),
        ({"power": True}, "power must be 1 or 2"),
        ({"r_max": 0}, "r_max must be an integer ≥ 1"),
        ({"init": "pissa"}, "init must be one of 'lora', 'gradient'"),
        ({"r_max": 17}, None),  # the cap min(d_in, d_out) applies first: fine
        ({"statistics": "both"}, "statistics must be one of"),
        ({"target_modules": ["k_proj"]}, "matched none of the statistics' modules"),
        ({"lora_targets": ["k_proj"], "budget": "like-lora=8"}, "matched none"),
    ],
)
def test_bad_options(options, message):
    stats = make_stats(LLAMA)
    opts = {"budget": 100, **options}
    if message is None:
        el.plan_auto(stats, **opts)
        return
    with pytest.raises(ValueError, match=message):
        el.plan_auto(stats, **opts)


def test_statistics_without_singular_values_say_to_probe_again():
    from dataclasses import replace

    stats = make_stats(LLAMA)
    for n in list(stats.modules):
        stats.modules[n] = replace(stats.modules[n], spectrum=None, signal_spectrum=None)
    with pytest.raises(ValueError, match=r"no singular values for 4 module\(s\).*re-probe"):
        el.plan_auto(stats, budget=100)


def test_r_max_above_the_kept_spectrum():
    stats = make_stats([("self_attn.q_proj", 0, 300, 200, [1.0] * 128)])
    with pytest.raises(ValueError, match=r"r_max=130 asks for more singular values.*r_max ≤ 128"):
        el.plan_auto(stats, budget=10_000, r_max=130)


def test_no_signal_anywhere():
    stats = make_stats([("self_attn.q_proj", 0, 4, 4, [0.0] * 4), ("mlp.up_proj", 0, 4, 4, None)])
    with pytest.raises(ValueError, match="no candidate module has a unit with signal"):
        el.plan_auto(stats, budget=100)


def test_from_a_model_is_refused():
    with pytest.raises(ValueError, match="auto plans from gradient statistics"):
        el.plan_auto(tiny_llama(layers=1), budget=100)


# -- end to end: probe all linear layers, plan, apply, export -----------------------------------
def test_probe_plan_apply_export(tmp_path):
    model = tiny_llama(layers=2)
    stats = el.probe(model, lm_batches(4), "all-linear", steps=4, progress=False)
    assert len(stats) == 14 and stats.meta["model_params"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = el.plan("auto", stats, budget=0.05)
    assert 0 < plan.num_trainable_params() <= 0.05 * stats.meta["model_params"]
    x = lm_batches(1, seed=3)[0]["input_ids"]
    before = model(input_ids=x).logits
    el.apply(model, plan)
    torch.testing.assert_close(model(input_ids=x).logits, before)  # B = 0
    assert num_trainable_params(model) == plan.num_trainable_params()
    info = el.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) and info is not None
