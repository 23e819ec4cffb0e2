"""AdaptationPlan: data model checks, JSON, parameter counting, validate(model), summary."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrolora.plans import (
    FORMAT_VERSION,
    AdaptationPlan,
    GroupPlan,
    ModulePlan,
    lori_kept,
)
from tiny import tiny_bert, tiny_llama

Q = "model.layers.{}.self_attn.q_proj"
QT = "model.layers.*.self_attn.q_proj"
K = "model.layers.{}.self_attn.k_proj"
KT = "model.layers.*.self_attn.k_proj"


def mp(layer, rank=4, fmt=Q, d_in=32, d_out=32, **kw):
    t = fmt.replace("{}", "*")
    return ModulePlan(rank=rank, d_in=d_in, d_out=d_out, module_type=t, layer=layer, **kw)


def shared_plan() -> AdaptationPlan:
    """E²ShareLoRA-like q_proj (A type-wide rank 4, B per interval), E²LoRA-like k_proj."""
    q = [Q.format(i) for i in range(4)]
    k = [K.format(i) for i in range(4)]
    groups = {
        f"{QT}:A": GroupPlan(tuple(q), ("A",), 4, QT),
        f"{QT}:i0": GroupPlan(tuple(q[:3]), ("B",), 4, QT),
        f"{QT}:i1": GroupPlan(tuple(q[3:]), ("B",), 2, QT),
        f"{KT}:i0": GroupPlan(tuple(k[:2]), ("A", "B"), 3, KT),
    }
    mods = {}
    for i in range(4):
        gid = f"{QT}:i{0 if i < 3 else 1}"
        mods[q[i]] = mp(i, 4 if i < 3 else 2, group=gid, shared={"A": f"{QT}:A", "B": gid})
        if i < 2:
            mods[k[i]] = mp(i, 3, K, d_out=16, group=f"{KT}:i0", shared={"A": f"{KT}:i0",
                                                                      "B": f"{KT}:i0"})  # fmt: skip
        else:
            mods[k[i]] = mp(i, 5, K, d_out=16, blocks=2)
    return AdaptationPlan("e2sharelora", mods, groups, 8.0, {"r": 4, "note": [1, 2]})


# -- counting -------------------------------------------------------------------------------------
def test_count_shared_once_and_slices():
    p = shared_plan()
    q = 4 * 32 + 4 * 32 + 2 * 32  # one A (rank 4), B of interval 0 (rank 4), B of interval 1
    k = 3 * (32 + 16) + 2 * 5 * (32 + 16)  # one shared (A, B); two block-diagonal, blocks-free
    assert p.num_trainable_params() == q + k
    assert p.max_rank == 10


@pytest.mark.parametrize(
    "kind, kw, per_module",
    [
        ("lora", {}, 4 * (24 + 16)),
        ("dora", {}, 4 * (24 + 16) + 16),
        ("vera", {}, 4 + 16),
        ("lori", {"sparsity": 0.9}, lori_kept(16 * 4, 0.9)),
        ("lori", {"sparsity": 0.0}, 16 * 4),
        ("flex", {"capacity": 9}, 4 * (16 + 1 + 24)),
    ],
)
def test_count_per_kind(kind, kw, per_module):
    mods = {Q.format(i): mp(i, 4, d_in=24, d_out=16, kind=kind, **kw) for i in range(3)}
    assert AdaptationPlan(kind, mods).num_trainable_params() == 3 * per_module


def test_lori_kept():
    assert lori_kept(64, 0.9) == 64 - 58  # round(57.6) = 58 masked
    assert lori_kept(10, 0.25) == 8  # round(2.5) = 2 (half to even)


# -- JSON -----------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    p = shared_plan()
    path = p.save(tmp_path / "sub" / "plan.json")
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    q = AdaptationPlan.load(path)
    assert q == p
    d = json.loads(path.read_text())
    assert d["format_version"] == FORMAT_VERSION and d["method"] == "e2sharelora"
    m = d["modules"][Q.format(0)]
    assert {"rank", "group", "blocks", "kind", "d_in", "d_out"} <= set(m)
    assert d["lora_alpha"] == 8.0


@settings(max_examples=50, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 64), min_size=1, max_size=6),
    alpha=st.floats(0.01, 1e4, allow_subnormal=False),
    kind=st.sampled_from(["lora", "dora", "vera", "lori", "flex"]),
    opts=st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
        max_size=4,
    ),
)
def test_json_round_trip_property(ranks, alpha, kind, opts):
    extra = {"capacity": 64} if kind == "flex" else ({"sparsity": 0.5} if kind == "lori" else {})
    mods = {Q.format(i): mp(i, r, kind=kind, **extra) for i, r in enumerate(ranks)}
    p = AdaptationPlan("hand", mods, {}, alpha, opts)
    assert AdaptationPlan.from_dict(json.loads(p.to_json())) == p


def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist; run `entrolora plan`"):
        AdaptationPlan.load(tmp_path / "nope.json")


def test_load_not_json(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        AdaptationPlan.load(tmp_path / "p.json")


def test_load_other_format():
    with pytest.raises(ValueError, match="not an entrolora plan"):
        AdaptationPlan.from_dict({"format": "entrolora.stats", "method": "x", "modules": {}})


def test_load_other_version():
    d = shared_plan().to_dict() | {"format_version": 99}
    with pytest.raises(ValueError, match="plan format version 99 is not 1"):
        AdaptationPlan.from_dict(d)


def test_load_missing_fields():
    with pytest.raises(ValueError, match=r"missing the field\(s\) \['modules'\]"):
        AdaptationPlan.from_dict({"method": "lora"})


def test_load_malformed_module():
    d = shared_plan().to_dict()
    d["modules"][Q.format(0)]["colour"] = "red"
    with pytest.raises(ValueError, match="malformed module or group entry"):
        AdaptationPlan.from_dict(d)


def test_load_bad_module_value_names_it():
    d = shared_plan().to_dict()
    d["modules"][K.format(3)]["blocks"] = 3
    with pytest.raises(
        ValueError, match=r"plan module 'model.layers.3.self_attn.k_proj': blocks=3"
    ):
        AdaptationPlan.from_dict(d)


def test_load_not_an_object():
    with pytest.raises(ValueError, match="a plan is a JSON object, got list"):
        AdaptationPlan.from_dict([1, 2])


# -- data model checks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kind": "ia3"}, "unknown adapter kind 'ia3'; known: lora, dora, vera, lori, flex"),
        ({"rank": 0}, "rank must be ≥ 1"),
        ({"rank": 2.0}, "ModulePlan.rank must be an integer"),
        ({"blocks": 3}, "blocks=3 must be a power of two dividing"),
        ({"blocks": 64}, "blocks=64 must be a power of two dividing"),
        ({"kind": "flex"}, "a flex module needs capacity ≥ rank"),
        ({"kind": "lori", "sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"shared": {"m": "g"}}, r"factor\(s\) \['m'\] cannot be shared"),
        ({"d_in": 0}, "d_in, d_out must be ≥ 1"),
    ],
)
def test_module_plan_checks(kw, match):
    args = {"rank": 4, "d_in": 32, "d_out": 32, "module_type": QT, "layer": 0} | kw
    with pytest.raises(ValueError, match=match):
        ModulePlan(**args)


def test_group_checks():
    with pytest.raises(ValueError, match="a group's rank must be ≥ 1"):
        GroupPlan((Q.format(0),), ("A",), 0, QT)
    with pytest.raises(ValueError, match=r"factor\(s\) \['P'\] cannot be shared"):
        GroupPlan((Q.format(0),), ("P",), 2, QT)
    assert GroupPlan([Q.format(0)], ["A"], 2, QT).members == (Q.format(0),)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m, g: m.__setitem__(Q.format(9), mp(9, shared={"A": "nope"})),
         "shares A with unknown group 'nope'"),
        (lambda m, g: g.__setitem__("x", GroupPlan((Q.format(9),), ("A",), 2, QT)),
         "group 'x' lists 'model.layers.9.self_attn.q_proj', which is not a plan module"),
        (lambda m, g: m.__setitem__(Q.format(9), mp(9, 8, shared={"A": f"{QT}:A"})),
         "does not list module"),
        (lambda m, g: m.__setitem__(Q.format(0), mp(0, 8, shared={"A": f"{QT}:A"})),
         "has rank 8 above its group's 4"),
        (lambda m, g: m.__setitem__(Q.format(0), mp(0, 4, group="zz")),
         "names unknown group 'zz'"),
    ],
)  # fmt: skip
def test_plan_consistency_checks(change, match):
    p = shared_plan()
    mods, groups = dict(p.modules), dict(p.groups)
    change(mods, groups)
    with pytest.raises(ValueError, match=match):
        AdaptationPlan("x", mods, groups)


def test_plan_needs_modules_and_alpha():
    with pytest.raises(ValueError, match="a plan needs at least one module"):
        AdaptationPlan("x", {})
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        AdaptationPlan("x", {Q.format(0): mp(0)}, lora_alpha=0.0)


# -- validate(model) ------------------------------------------------------------------------------
def llama_plan(hidden=32, layers=2):
    mods = {Q.format(i): mp(i, 2, d_in=hidden, d_out=hidden) for i in range(layers)}
    mods |= {K.format(i): mp(i, 2, K, d_in=hidden, d_out=hidden // 2) for i in range(layers)}
    return AdaptationPlan("lora", mods)


def test_validate_ok():
    llama_plan().validate(tiny_llama(layers=2))


def test_validate_other_width():
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' expects d_in×d_out "
                       r"32×32 but the model has 64×64"):  # fmt: skip
        llama_plan().validate(tiny_llama(layers=2, hidden=64))


def test_validate_missing_module():
    with pytest.raises(
        ValueError, match="the model has no module 'model.layers.2.self_attn.q_proj'"
    ):
        llama_plan(layers=3).validate(tiny_llama(layers=2))


def test_validate_other_architecture():
    with pytest.raises(
        ValueError, match="the model has no module 'model.layers.0.self_attn.q_proj'"
    ):
        llama_plan().validate(tiny_bert(layers=2))


def test_validate_not_linear():
    name = "model.layers.0.input_layernorm"
    p = AdaptationPlan("lora", {name: ModulePlan(2, 32, 32, "model.layers.*.input_layernorm", 0)})
    with pytest.raises(ValueError, match="is a LlamaRMSNorm in this model, not a linear layer"):
        p.validate(tiny_llama(layers=2))


# -- summary --------------------------------------------------------------------------------------
def test_summary_table():
    text = shared_plan().summary()
    lines = text.splitlines()
    assert "method e2sharelora" in lines[0] and "trainable params" in lines[0]
    assert f"{shared_plan().num_trainable_params():,}" in lines[0]
    header = lines[2]
    assert header.split("|")[1].split() == ["0", "1", "2", "3"]
    q_row = next(line for line in lines if line.startswith(QT))
    assert q_row.split("|")[1].split() == ["4@i0", "4@i0", "4@i0", "2@i1"]
    k_row = next(line for line in lines if line.startswith(KT))
    assert k_row.split("|")[1].split() == ["3@i0", "3@i0", "5x2", "5x2"]


# -- validate(model): the other direction (every targeted module planned) --------------------
def test_validate_refuses_plan_for_fewer_layers():
    # a 2-layer plan on a 3-layer model of the same width would leave layer 2 bare
    with pytest.raises(
        ValueError,
        match=r"leaves 2 module\(s\) of this model bare, e.g. 'model.layers.2.self_attn.q_proj': "
        r"it adapts layer\(s\) 0-1 of 'model.layers.\*.self_attn.q_proj', the model has 0-2",
    ):
        llama_plan(layers=2).validate(tiny_llama(layers=3))


def test_validate_recorded_targets_allow_some_layers():
    import entrolora as el

    model = tiny_llama(layers=3)
    plan = el.plan_lora(model, r=2, target_modules=["layers.0.self_attn.q_proj"])
    assert sorted(plan.targeted(model)) == [Q.format(0)]
    plan.validate(model)  # the recorded targets select exactly the planned module
    with pytest.raises(ValueError, match=r"adapts layer\(s\) 0 of .* the model has 0-2"):
        AdaptationPlan("lora", plan.modules).validate(model)  # no record: the whole type


def test_validate_recorded_targets_on_a_deeper_model():
    import entrolora as el

    plan = el.plan_lora(tiny_llama(layers=2), r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'model.layers.2.self_attn.q_proj'"):
        plan.validate(tiny_llama(layers=3))
