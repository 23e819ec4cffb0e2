"""entrolora.plan_figure: the plan figure draws what was trained.

Heights are read back from the matplotlib artists and compared with ranks computed here from the
plan's own fields (blocks × block rank; FlexLoRA: the last history entry), colours and legend
entries with what the plan shares.
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrolora.plans import AdaptationPlan, GroupPlan, ModulePlan
from entrolora.report.plan_figure import OWN, final_ranks, plan_bars, plan_figure, trained_params

TYPES = ("model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj")


def _name(t: str, layer: int) -> str:
    return t.replace("*", str(layer))


def _block_plan(ranks_blocks: list[tuple[int, int]]) -> AdaptationPlan:
    """A RaLoRA-like plan: per layer (block rank, blocks), the same in both module types."""
    mods = {
        _name(t, layer): ModulePlan(rank=r, d_in=64, d_out=64, module_type=t, layer=layer, blocks=n)
        for t in TYPES
        for layer, (r, n) in enumerate(ranks_blocks)
    }
    return AdaptationPlan(method="ralora", modules=mods)


def _flex_plan(layers: int = 4, rank: int = 4) -> AdaptationPlan:
    mods = {
        _name(t, layer): ModulePlan(
            rank=rank, d_in=16, d_out=24, module_type=t, layer=layer, kind="flex", capacity=12
        )  # fmt: skip
        for t in TYPES
        for layer in range(layers)
    }
    return AdaptationPlan(method="flexlora", modules=mods)


def _shared_plan() -> AdaptationPlan:
    """Layers 0-1 share A and B (one group), layer 2 is alone in its interval, layer 3 plain."""
    t = TYPES[0]
    names = [_name(t, layer) for layer in range(4)]
    groups = {
        "g0": GroupPlan(members=tuple(names[:2]), factors=("A", "B"), rank=6, module_type=t),
        "g1": GroupPlan(members=(names[2],), factors=("A", "B"), rank=3, module_type=t),
    }
    mods = {
        names[0]: ModulePlan(6, 16, 16, t, 0, group="g0", shared={"A": "g0", "B": "g0"}),
        names[1]: ModulePlan(6, 16, 16, t, 1, group="g0", shared={"A": "g0", "B": "g0"}),
        names[2]: ModulePlan(3, 16, 16, t, 2, group="g1", shared={"A": "g1", "B": "g1"}),
        names[3]: ModulePlan(2, 16, 16, t, 3),
    }
    return AdaptationPlan(method="e2lora", modules=mods, groups=groups)


def _drawn(fig) -> list[tuple[list[float], list[float] | None]]:
    """Per panel: the heights of the trained bars and (FlexLoRA) of the initial ones."""
    out = []
    for ax in fig.axes:
        cs = ax.containers
        trained = [p.get_height() for p in cs[0]]
        initial = [p.get_height() for p in cs[1]] if len(cs) > 1 else None
        out.append((trained, initial))
    return out


def _legend_labels(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()]


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_block_diagonal_heights_are_blocks_times_block_rank():
    rb = [(8, 1), (8, 2), (4, 4), (2, 8)]
    fig, bars = plan_figure(_block_plan(rb))
    try:
        expected = [float(r * n) for r, n in rb]  # 8, 16, 16, 16
        assert _drawn(fig) == [(expected, None), (expected, None)]
        assert [b.rank for b in bars[TYPES[0]]] == expected
        labels = [t.get_text() for t in fig.axes[0].texts]
        assert labels == ["2×8", "4×4", "8×2"]  # one-block modules carry no label
        assert any("n diagonal blocks of rank r" in s for s in _legend_labels(fig))
        assert not any("shared" in s and "nothing" not in s for s in _legend_labels(fig))
    finally:
        _close(fig)


def test_flexlora_draws_final_ranks_with_initial_beside():
    plan = _flex_plan()
    names = list(plan.modules)
    history = [
        [10, dict.fromkeys(names, 4)],
        [20, {n: 2 + i for i, n in enumerate(names)}],  # the last entry: the ranks exported
    ]
    fig, bars = plan_figure(plan, history, title="runs/flex (flexlora)")
    try:
        final = history[-1][1]
        expected = [([float(final[_name(t, layer)]) for layer in range(4)], [4.0] * 4)
                    for t in TYPES]  # fmt: skip
        assert _drawn(fig) == expected
        assert "runs/flex (flexlora): final rank per module" in fig._suptitle.get_text()
        assert any("initial rank (FlexLoRA)" in s for s in _legend_labels(fig))
        # the final bars are solid, the initial ones faint
        ax = fig.axes[0]
        assert ax.containers[0][0].get_alpha() in (None, 1.0)
        assert ax.containers[1][0].get_alpha() < 0.5
    finally:
        _close(fig)


def test_flexlora_without_history_draws_the_plan():
    fig, _ = plan_figure(_flex_plan())
    try:
        assert _drawn(fig) == [([4.0] * 4, None)] * 2
    finally:
        _close(fig)


def test_trained_params_counts_final_flex_ranks():
    plan = _flex_plan(layers=2, rank=4)
    final = {n: r for n, r in zip(plan.modules, (1, 7, 0, 4))}
    expected = sum(r * (24 + 16 + 1) for r in final.values())  # P, λ, Q per active direction
    assert trained_params(plan, [[5, final]]) == expected
    assert trained_params(plan) == plan.num_trainable_params() == 4 * 4 * 41


def test_sharing_shown_only_where_shared():
    fig, bars = plan_figure(_shared_plan())
    try:
        groups = [b.group for b in bars[TYPES[0]]]
        assert groups == ["g0", "g0", None, None]  # a one-member interval shares nothing
        colours = [mcolors.to_hex(p.get_facecolor()) for p in fig.axes[0].containers[0]]
        own = mcolors.to_hex(OWN)
        assert colours[0] == colours[1] != own and colours[2] == colours[3] == own
        assert any(s.startswith("shared group") for s in _legend_labels(fig))
        assert "1 shared group" in fig.axes[0].get_title()
    finally:
        _close(fig)

    fig, _ = plan_figure(_block_plan([(4, 1), (4, 1)]))  # plain LoRA: nothing shared
    try:
        colours = {mcolors.to_hex(p.get_facecolor()) for ax in fig.axes for p in ax.containers[0]}
        assert colours == {mcolors.to_hex(OWN)}
        assert not any(s.startswith("shared group") for s in _legend_labels(fig))
        assert "shared" not in fig.axes[0].get_title()
    finally:
        _close(fig)


def test_final_ranks_of_empty_history():
    assert final_ranks(None) == {} and final_ranks([]) == {}
    assert final_ranks([[1, {"a": 2}], [3, {"a": 5}]]) == {"a": 5}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.sampled_from([1, 2, 4, 8])), min_size=1,
                max_size=6))  # fmt: skip
def test_heights_equal_effective_ranks(rb):
    bars = plan_bars(_block_plan(rb))
    for t in TYPES:
        assert [b.rank for b in bars[t]] == [r * n for r, n in rb]
        assert [b.layer for b in bars[t]] == list(range(len(rb)))


def test_plot_plan_writes_png(tmp_path):
    from entrolora.report.plan_figure import plot_plan

    path = plot_plan(_block_plan([(4, 2)]), tmp_path / "p.png", title="x")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["lora", "sharelora"])
def test_real_planner_plans(method):
    """Plans from the basic planners: heights = rank × blocks, sharing only for ShareLoRA."""
    import entrolora as el
    from test_report import _stats

    plan = el.plan(method, _stats(), r=4)
    fig, bars = plan_figure(plan)
    try:
        flat = [b for bs in bars.values() for b in bs]
        assert [b.rank for b in flat] == [
            plan.modules[b.name].rank * plan.modules[b.name].blocks for b in flat
        ]
        assert any(b.group for b in flat) == (method == "sharelora")
    finally:
        _close(fig)
