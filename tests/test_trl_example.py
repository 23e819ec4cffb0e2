"""examples/trl_sft.py: TRL's SFTTrainer steps an el.apply-ed model (skipped without trl)."""

from __future__ import annotations

import pytest
import torch

from scripts import load_script


def test_trl_sft_trainer_steps_an_entrolora_model(tmp_path):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import entrolora as el
    from entrolora.adapters.inject import adapted_modules
    from entrolora.data import sft as S
    from sft_tiny import save_tiny_sft_model, sft_rows, write_jsonl

    ex = load_script("examples/trl_sft.py")
    folder = save_tiny_sft_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ds = S.load_sft(write_jsonl(tmp_path / "d.jsonl", sft_rows(16)))
    model = ex.adapt(model, tok, ds, "e2lora", 2)  # probed with the job's SFT loss
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = ex.build_trainer(model, tok, ds, str(tmp_path / "out"), max_steps=1,
                               per_device_train_batch_size=4, learning_rate=1e-2,
                               max_length=32, use_cpu=True)  # fmt: skip
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad
               and not torch.equal(p, before[n])]  # fmt: skip
    assert changed and set(changed) <= set(before)  # only the adapters trained
    assert len(adapted_modules(model)) > 0
    el.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "plan.json").is_file()
