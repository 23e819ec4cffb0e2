"""Target discovery: suffixes, full names, regexes, Conv1D orientation, and every bad input."""

from __future__ import annotations

import pytest
from torch import nn

from entrolora.targets import (
    Target,
    find_targets,
    get_module,
    is_linear,
    linear_dims,
    split_module_name,
)
from tiny import tiny_bert, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=3)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(layers=2)


def test_suffixes_pick_every_layer_ordered_by_type_then_layer(llama):
    targets = find_targets(llama, ["v_proj", "q_proj"])
    assert list(targets) == [
        f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "v_proj") for i in range(3)
    ]
    q = targets["model.layers.2.self_attn.q_proj"]
    assert q == Target(
        "model.layers.2.self_attn.q_proj", "model.layers.*.self_attn.q_proj", 2, 32, 32, False
    )
    v = targets["model.layers.0.self_attn.v_proj"]
    assert (v.d_in, v.d_out) == (32, 16)  # GQA: 2 kv heads of 8


def test_full_names_and_dotted_suffixes(llama):
    targets = find_targets(llama, ["model.layers.1.mlp.down_proj", "self_attn.o_proj"])
    assert list(targets) == ["model.layers.1.mlp.down_proj"] + [
        f"model.layers.{i}.self_attn.o_proj" for i in range(3)
    ]
    assert targets["model.layers.1.mlp.down_proj"].d_in == 64


def test_regex_matches_whole_names(llama):
    targets = find_targets(llama, r"model\.layers\.[02]\.self_attn\.(q|k)_proj")
    assert sorted(targets) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 2) for p in "qk"
    )
    # fullmatch, not search: a regex matching a part of the name matches nothing
    with pytest.raises(
        ValueError, match=r"regex 'q_proj' matched no module; it must match the whole"
    ):
        find_targets(llama, "q_proj")


def test_conv1d_is_linear_and_transposed(gpt2):
    targets = find_targets(gpt2, ["c_attn", "mlp.c_proj"])
    t = targets["transformer.h.0.attn.c_attn"]
    assert t.transposed and (t.d_in, t.d_out) == (32, 96)
    assert tuple(gpt2.get_submodule(t.name).weight.shape) == (32, 96)  # stored (d_in, d_out)
    assert targets["transformer.h.1.mlp.c_proj"].module_type == "transformer.h.*.mlp.c_proj"
    assert "transformer.h.0.attn.c_proj" not in targets


def test_bert_types():
    targets = find_targets(tiny_bert(layers=2), ["query", "attention.output.dense"])
    assert {t.module_type for t in targets.values()} == {
        "bert.encoder.layer.*.attention.self.query",
        "bert.encoder.layer.*.attention.output.dense",
    }


def test_no_match_names_pattern_and_candidates(llama):
    with pytest.raises(ValueError, match=r"'qproj' matched no module.*candidates: .*q_proj"):
        find_targets(llama, ["q_proj", "qproj"])


def test_non_linear_match_is_refused(llama):
    with pytest.raises(
        ValueError,
        match=r"'self_attn' matches 'model.layers.0.self_attn', a LlamaAttention, not a linear.*"
        r"Linear candidates: .*q_proj",
    ):
        find_targets(llama, ["self_attn"])


def test_non_linear_regex_match_is_refused(gpt2):
    with pytest.raises(ValueError, match=r"matches 'transformer.h.0.attn', a GPT2Attention"):
        find_targets(gpt2, r"transformer\.h\.\d+\.attn.*")


def test_no_layer_index_is_refused(llama):
    with pytest.raises(ValueError, match=r"'lm_head'.*'lm_head' has no layer index"):
        find_targets(llama, ["lm_head"])


def test_bert_pooler_has_no_layer_index():
    with pytest.raises(ValueError, match=r"'dense'.*'bert.pooler.dense' has no layer index"):
        find_targets(tiny_bert(layers=1), ["dense"])


def test_empty_list(llama):
    with pytest.raises(ValueError, match=r"target_modules is empty.*\['q_proj'\]"):
        find_targets(llama, [])


def test_bad_regex(llama):
    with pytest.raises(ValueError, match=r"regex 'q_proj\(' is invalid"):
        find_targets(llama, "q_proj(")


@pytest.mark.parametrize("entry", ["", None, 3])
def test_bad_entries(llama, entry):
    with pytest.raises(ValueError, match="entries must be non-empty strings"):
        find_targets(llama, ["q_proj", entry])


def test_split_module_name():
    assert split_module_name("model.layers.12.mlp.up_proj") == ("model.layers.*.mlp.up_proj", 12)
    assert split_module_name("encoder.3.block.7.fc") == ("encoder.*.block.7.fc", 3)
    with pytest.raises(ValueError, match=r"'head.fc' has no layer index"):
        split_module_name("head.fc")


def test_is_linear_and_dims(gpt2):
    lin = nn.Linear(3, 5)
    assert is_linear(lin) and linear_dims(lin) == (3, 5)
    assert not is_linear(nn.Embedding(4, 2)) and not is_linear(nn.Conv1d(2, 2, 1))
    conv = gpt2.transformer.h[0].attn.c_attn
    assert is_linear(conv) and linear_dims(conv) == (32, 96)


def test_get_module(llama):
    assert (
        get_module(llama, "model.layers.0.self_attn.q_proj")
        is llama.model.layers[0].self_attn.q_proj
    )
    with pytest.raises(ValueError, match=r"no module 'model.layers.9.q'.*another model"):
        get_module(llama, "model.layers.9.q")


def test_all_linear_picks_every_linear_of_the_layer_stack(llama):
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for spec in ("all-linear", ["all-linear"]):
        targets = find_targets(llama, spec)
        part = {p: "self_attn" if p[0] in "qkvo" else "mlp" for p in leaves}
        want = [f"model.layers.{i}.{part[p]}.{p}" for p in leaves for i in range(3)]
        assert sorted(targets) == sorted(want)
    bert = tiny_bert(layers=2)  # the pooler and the classifier sit outside the stack
    names = find_targets(bert, "all-linear")
    assert len(names) == 12 and not any("pooler" in n or "classifier" in n for n in names)


def test_all_linear_without_a_layer_stack():
    with pytest.raises(ValueError, match="'all-linear' found no linear layer inside a layer stack"):
        find_targets(nn.ModuleDict({"head": nn.Linear(2, 2)}), "all-linear")
