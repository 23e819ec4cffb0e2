"""FlexLoRA's moved slots start like fresh parameters under Adam/AdamW (METHODS.md §5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrolora.flex import FlexLoRA
from entrolora.flex.optim import base_optimizer
from test_flex import BATCHES, flex_llama, train, trainable


def _slot(a, slot) -> list[torch.Tensor]:
    return [a.P[:, slot], a.lambda_[slot : slot + 1], a.Q[slot]]


def slot_update_ratios(
    amsgrad: bool, old_step: int | None, correct: bool = True, fused: bool = False
) -> list[float]:
    """‖update of a just-expanded slot‖ / ‖update of a fresh AdamW fed the same gradients‖
    over the ten steps after the expansion (the training optimizer ``fused`` or not)."""
    model = flex_llama(r=2, capacity=4)
    flex = FlexLoRA(model, total_steps=100, t_warmup=90, t_final=0)  # no scheduled move here
    hyper = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    opt = torch.optim.AdamW(trainable(model), **hyper, fused=fused or None)
    train(model, flex, opt, range(5))
    if old_step is not None:  # as after a long run: torch's bias correction ≈ 1
        for st in opt.state.values():
            st["step"].fill_(old_step)
    name, a = next(iter(flex.modules.items()))
    (model(**BATCHES[5]).loss + flex.regularizer()).backward()
    slot = flex.expand(name, opt)  # after backward, before the step, as flex.step does
    if not correct:
        flex.fresh.young.clear()  # moments zeroed, bias correction left to torch
    opt.step()
    opt.zero_grad(set_to_none=True)
    ref = [nn.Parameter(t.detach().clone()) for t in _slot(a, slot)]
    ref_opt = torch.optim.AdamW(ref, **hyper)
    ratios = []
    for t in range(6, 16):
        (model(**BATCHES[t % len(BATCHES)]).loss + flex.regularizer()).backward()
        assert flex.step(t, opt) == ([], [])
        grads = [a.P.grad[:, slot], a.lambda_.grad[slot : slot + 1], a.Q.grad[slot]]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        before = torch.cat([x.detach().clone() for x in _slot(a, slot)])
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_before = torch.cat([x.detach().clone() for x in ref])
        ref_opt.step()
        got = torch.cat([x.detach() for x in _slot(a, slot)]) - before
        want = torch.cat([x.detach() for x in ref]) - ref_before
        ratios.append((got.norm() / want.norm()).item())
    return ratios


@pytest.mark.parametrize("fused", [False, True])  # the job trains with fused AdamW
@pytest.mark.parametrize("old_step", [None, 3000])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_moved_slot_updates_like_a_fresh_adamw(amsgrad, old_step, fused):
    ratios = slot_update_ratios(amsgrad, old_step, fused=fused)
    assert all(1 / 1.5 <= r <= 1.5 for r in ratios), ratios
    assert all(abs(r - 1) < 1e-3 for r in ratios), ratios  # the correction is exact


@pytest.mark.parametrize("old_step, worst", [(None, lambda r: min(r) < 1 / 1.5),
                                              (3000, lambda r: max(r) > 2.5)])  # fmt: skip
def test_zeroed_moments_alone_are_not_fresh(old_step, worst):
    """Without the correction torch's one step count per tensor skews the slot's updates: too
    small early in a run, several times the learning rate late in it (what the test above
    would catch)."""
    assert worst(slot_update_ratios(False, old_step, correct=False))


def test_slots_leave_the_record_once_mature():
    model = flex_llama(r=2, capacity=4)
    flex = FlexLoRA(model, total_steps=100, t_warmup=90, t_final=0)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3, betas=(0.5, 0.6))  # short memory
    train(model, flex, opt, range(3))
    name = next(iter(flex.modules))
    (model(**BATCHES[3]).loss).backward()
    slot = flex.expand(name, opt)
    assert flex.fresh.young == {name: {slot: [-1, 3]}}  # before step 4, which applies 0
    train(model, flex, opt, range(4, 20))
    assert flex.fresh.young == {name: {slot: [15, 19]}}  # age 15 after step 19
    assert int(opt.state[flex.modules[name].lambda_]["step"]) == 19
    train(model, flex, opt, range(20, 60))  # 0.6^j within 1e-7 of 0.6^k: mature
    assert flex.fresh.young == {}


def test_prune_forgets_the_slot():
    model = flex_llama(r=2, capacity=4)
    flex = FlexLoRA(model, total_steps=100, t_warmup=90, t_final=0)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)
    train(model, flex, opt, range(2))
    name = next(iter(flex.modules))
    slot = flex.expand(name, opt)
    with torch.no_grad():
        flex.modules[name].lambda_[slot] = 0.0  # now the smallest own term
    assert flex.prune(name, opt) == slot and flex.fresh.young == {}


def test_accelerate_style_wrapper_is_unwrapped():
    model = flex_llama()
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)

    class Wrapper(torch.optim.Optimizer):  # as accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert base_optimizer(Wrapper(opt)) is opt and base_optimizer(opt) is opt
    flex = FlexLoRA(model, total_steps=20, t_warmup=10, t_final=0)
    assert flex.step(0, Wrapper(opt)) == ([], [])
    assert opt in flex._hooks and len(opt._optimizer_step_post_hooks) == 1
    flex.step(1, opt)  # hooked once
    assert len(opt._optimizer_step_post_hooks) == 1


def test_other_adaptive_optimizers_warn():
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20, t_warmup=10, t_final=0)
    with pytest.warns(UserWarning, match="corrects their bias correction only under torch.optim"):
        flex.step(0, torch.optim.NAdam(trainable(model), lr=1e-3))


def test_off_schedule_steps_read_nothing(monkeypatch):
    model = flex_llama()
    flex = FlexLoRA(model, total_steps=20, t_warmup=10, t_final=0)
    opt = torch.optim.AdamW(trainable(model), lr=1e-3)

    def boom():
        raise AssertionError("an off-schedule step read the model")

    monkeypatch.setattr(flex, "_snapshot", boom)
    train(model, flex, opt, range(10))  # steps 0..9: before t_warmup
