"""save / load (export/io.py) for every adapter kind, bad checkpoints, and the Trainer callback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import entrolora as el
from entrolora.adapters.inject import adapted_modules
from entrolora.export.io import ADAPTER_FILE, PLAN_FILE, adapter_state
from test_adapters import CASES, _targets, build
from tiny import lm_batches, tiny_gpt2, tiny_llama

IDS = lm_batches(1, seed=3)[0]["input_ids"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_round_trip(case, model_name, tmp_path):
    model, plan = build(case, model_name, seed=1)
    want = logits(model)
    el.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_FILE, PLAN_FILE]  # no temp left
    fresh = type(model)(model.config).eval()  # a different random init of the adapters below
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".adapter." not in k}, strict=False
    )
    factory = {"llama": tiny_llama, "gpt2": tiny_gpt2}[model_name]
    loaded = el.load(factory(layers=4, seed=0), tmp_path)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=0)
    assert el.AdaptationPlan.load(tmp_path / PLAN_FILE) == plan
    # each shared tensor once: as many stored tensors as distinct live tensors
    live = {
        id(t)
        for w in adapted_modules(model).values()
        for t in w.adapter.state_dict(keep_vars=True).values()
    }
    assert len(load_file(tmp_path / ADAPTER_FILE)) == len(live)


def test_saved_keys_name_groups_and_modules(tmp_path):
    model, plan = build("sharelora_slice")
    el.save(model, tmp_path)
    keys = set(load_file(tmp_path / ADAPTER_FILE))
    mtype = "model.layers.*.self_attn.q_proj"
    assert f"{mtype}:type.A" in keys and f"{mtype}:0.B" in keys and f"{mtype}:1.B" in keys
    model, _ = build("plain")
    el.save(model, tmp_path / "plain")
    assert "model.layers.0.self_attn.q_proj.A" in load_file(tmp_path / "plain" / ADAPTER_FILE)


def test_buffers_and_masks_are_saved(tmp_path):
    for case in ("vera", "lori"):
        model, _ = build(case)
        el.save(model, tmp_path / case)
        stored = load_file(tmp_path / case / ADAPTER_FILE)
        for key, t in adapter_state(model).items():
            assert torch.equal(stored[key], t.detach())
        if case == "lori":
            assert any(v.dtype == torch.bool for v in stored.values())


def test_load_restores_values_not_seed(tmp_path):
    model, _ = build("dora", seed=3)
    el.save(model, tmp_path)
    loaded = el.load(tiny_llama(layers=4), tmp_path)
    for key, t in adapter_state(loaded).items():
        assert torch.equal(t, adapter_state(model)[key])


def test_save_with_flex_state(tmp_path):
    class Flex:
        def state_dict(self):
            return {"format": "entrolora.flex", "step": 3}

    model, _ = build("plain")
    el.save(model, tmp_path, flex=Flex())
    assert json.loads((tmp_path / "flex_state.json").read_text())["step"] == 3


# -- bad checkpoints -------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model, _ = build("intervals")
    el.save(model, tmp_path)
    return tmp_path


def _assert_untouched(model):
    assert not adapted_modules(model) and not hasattr(model, "entrolora_plan")
    assert all(p.requires_grad for p in model.parameters())


def test_missing_plan_json(saved):
    (saved / PLAN_FILE).unlink()
    with pytest.raises(ValueError, match="plan.json' does not exist; pass a directory written by"):
        el.load(tiny_llama(layers=4), saved)


def test_missing_adapter_file(saved):
    (saved / ADAPTER_FILE).unlink()
    with pytest.raises(ValueError, match="adapter.safetensors' does not exist"):
        el.load(tiny_llama(layers=4), saved)


def test_corrupted_safetensors(saved):
    (saved / ADAPTER_FILE).write_bytes(b"\x00\x01garbage" * 10)
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match="is corrupted or truncated"):
        el.load(model, saved)
    _assert_untouched(model)


def test_truncated_safetensors(saved):
    data = (saved / ADAPTER_FILE).read_bytes()
    (saved / ADAPTER_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="is corrupted or truncated"):
        el.load(tiny_llama(layers=4), saved)


def test_plan_for_another_model(saved):
    with pytest.raises(ValueError, match="the model has no module 'model.layers.0"):
        el.load(tiny_gpt2(layers=4), saved)
    with pytest.raises(ValueError, match="expects d_in×d_out"):
        el.load(tiny_llama(layers=4, hidden=48), saved)


def _rewrite(path, edit):
    tensors = load_file(path / ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, path / ADAPTER_FILE)


def test_shape_mismatch_on_load(saved):
    key = "model.layers.*.self_attn.q_proj:0.A"
    _rewrite(saved, lambda t: t.__setitem__(key, torch.zeros(5, 32)))
    model = tiny_llama(layers=4)
    with pytest.raises(
        ValueError, match=r"has shape \(5, 32\) in adapter.safetensors but \(2, 32\)"
    ):
        el.load(model, saved)
    _assert_untouched(model)


def test_missing_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.*.self_attn.v_proj:1.B"))
    with pytest.raises(
        ValueError, match=r"missing tensors \['model.layers.\*.self_attn.v_proj:1.B'\]"
    ):
        el.load(tiny_llama(layers=4), saved)


def test_extra_tensor(saved):
    _rewrite(saved, lambda t: t.__setitem__("stowaway", torch.zeros(1)))
    with pytest.raises(ValueError, match=r"unexpected tensors \['stowaway'\]"):
        el.load(tiny_llama(layers=4), saved)


def test_save_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="the model has no entrolora adapters"):
        el.save(tiny_llama(layers=1), tmp_path)


# -- Hugging Face Trainer --------------------------------------------------------------------------
def test_trainer_callback_saves_adapter_only_checkpoints(tmp_path):
    from transformers import Trainer, TrainingArguments

    from entrolora.integrations.transformers import EntroloraCallback

    model = tiny_llama(layers=4)
    el.apply(model, CASES["intervals"](_targets(model, ["q_proj", "v_proj"])))
    data = [{"input_ids": b["input_ids"][0], "labels": b["input_ids"][0]} for b in lm_batches(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_total_limit=1,
    )  # fmt: skip
    callback = EntroloraCallback()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    # shared tensors: the Trainer's own save_pretrained would refuse them; save_total_limit=1
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    ckpt = tmp_path / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter"]
    assert sorted(p.name for p in (ckpt / "adapter").iterdir()) == [ADAPTER_FILE, PLAN_FILE]
    loaded = el.load(tiny_llama(layers=4), tmp_path / "checkpoint-2" / "adapter")
    for key, t in adapter_state(loaded).items():
        assert torch.equal(t, adapter_state(model)[key])
    assert any((t != 0).any() for k, t in adapter_state(loaded).items() if k.endswith(".B"))


def test_trainer_callback_refuses_plain_model(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from entrolora.integrations.transformers import EntroloraCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="has no entrolora adapters; el.apply"):
        EntroloraCallback().on_train_begin(
            args, TrainerState(), TrainerControl(), model=tiny_llama(layers=1)
        )
    model, _ = build("plain")
    args.load_best_model_at_end = True
    with pytest.raises(ValueError, match="load_best_model_at_end needs the Trainer's own"):
        EntroloraCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_trainer_callback_with_trainer_checkpoints_and_limit(tmp_path):
    from transformers import Trainer, TrainingArguments

    from entrolora.integrations.transformers import EntroloraCallback

    model, _ = build("plain", randomize=False)  # unshared: save_pretrained accepts it
    data = [{"input_ids": b["input_ids"][0], "labels": b["input_ids"][0]} for b in lm_batches(6)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, save_steps=1, per_device_train_batch_size=2,
        report_to=[], use_cpu=True, save_total_limit=2,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[EntroloraCallback(trainer_checkpoints=True)]).train()  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "adapter" / ADAPTER_FILE).is_file()
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()


@pytest.mark.gpu
def test_save_load_on_cuda(tmp_path):
    model, _ = build("sharelora_slice")
    model.cuda()
    el.save(model, tmp_path)
    loaded = el.load(tiny_llama(layers=4).cuda(), tmp_path)
    for key, t in adapter_state(loaded).items():
        assert t.is_cuda and torch.equal(t, adapter_state(model)[key])
    torch.testing.assert_close(loaded(IDS.cuda()).logits, model(IDS.cuda()).logits)
