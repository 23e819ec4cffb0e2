"""entrolora's LoRA trains step for step like peft's LoRA when both start from the same factors.

So a gap between ``lora`` and ``peft-lora`` in a benchmark comes from the draw of A (peft draws
it from the global RNG, entrolora from a seeded generator), not from the adapter's forward, its
scale, its gradients or what it leaves trainable."""

from __future__ import annotations

import copy

import pytest
import torch

import entrolora as el
from tiny import cls_batches, tiny_bert

TARGETS = ["attention.self.query", "attention.self.value", "attention.output.dense"]


@pytest.mark.parametrize("r", [2, 4])
def test_lora_trains_like_peft_lora_from_the_same_init(r):
    peft = pytest.importorskip("peft")
    base = tiny_bert(seed=0)
    plan = el.plan("lora", base, r=r, lora_alpha=16, target_modules=TARGETS)
    ours = el.apply(copy.deepcopy(base), plan).eval()
    config = peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()  # it returns train mode
    inner = theirs.base_model.model
    adapted = el.adapted_modules(ours)
    assert len(adapted) == 12
    for name, module in adapted.items():
        with torch.no_grad():
            module.adapter.A.copy_(inner.get_submodule(name).lora_A["default"].weight)

    def trainable(model):
        return {n.replace("base_model.model.", ""): p for n, p in model.named_parameters()
                if p.requires_grad}  # fmt: skip

    assert sum(p.numel() for p in trainable(ours).values()) == sum(
        p.numel() for p in trainable(theirs).values()
    )
    opts = [torch.optim.AdamW(trainable(m).values(), lr=1e-2) for m in (ours, theirs)]
    for batch in cls_batches(6, seed=1):  # eval mode: dropout off, same function on both
        losses = []
        for model, opt in zip((ours, theirs), opts):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for name, module in adapted.items():
        B = inner.get_submodule(name).lora_B["default"].weight
        assert B.abs().max() > 1e-3  # it trained
        assert torch.allclose(module.adapter.B, B, atol=1e-5), name
