"""Optimizer state of FlexLoRA's moved slots (METHODS.md §5): reset, then start like a fresh one.

A pruned or expanded slot gets its gradient and its per-element moments zeroed. That is not yet
a fresh start under Adam: PyTorch keeps one step count ``k`` per tensor, so the slot's zeroed
moments are bias-corrected with ``1 − β^k`` (≈ 1) instead of the ``1 − β^j`` of a parameter
that is ``j`` steps old, and its first updates come out several times the learning rate.
``FreshSlots`` records each reset slot's birth (the step that applies its cleared gradient)
and, in a post-hook of ``optimizer.step()``, replaces the update torch applied to that slot by
the one a fresh Adam/AdamW would have applied (same moments, bias correction of age
``j = k − birth``):

    u(n) = −lr/(1 − β₁ⁿ) · m / (√v̂ / √(1 − β₂ⁿ) + eps),   param += u(j) − u(k)

with ``v̂`` = ``exp_avg_sq`` (or ``max_exp_avg_sq`` with amsgrad), exactly torch's formula
(``torch/optim/adam.py``; weight decay is the same for both and cancels). A slot leaves the
record once both bias corrections agree to 1e-7 (β₂ = 0.999: after about 16,000 steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .adapters.flex import FlexAdapter
from .flex_ops import local_slots

# Per-element optimizer state that describes one slot: zeroed when the slot is pruned or
# expanded. Other per-element keys are left as they are, with a warning.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
MATURE_RTOL = 1e-7


def slot_parts(adapter: FlexAdapter) -> tuple[tuple[torch.Tensor, int], ...]:
    """``((param, slot dimension), …)`` for P (columns), λ and Q (rows)."""
    return ((adapter.P, 1), (adapter.lambda_, 0), (adapter.Q, 0))


def base_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers that keep it at ``.optimizer`` (accelerate)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def clear_slot(adapter: FlexAdapter, slot: int, optimizer: Any, warned: set[str]) -> None:
    """Zero the gradient and the optimizer moments of one slot of P, λ and Q.

    Scalar state (``step``) and state shaped unlike the parameter (factored statistics) is
    untouched; unknown per-element keys are left as they are and reported once.
    """
    state = optimizer.state if optimizer is not None else {}
    for param, dim in slot_parts(adapter):
        tensors = [param.grad] if param.grad is not None else []
        st = state.get(param) if hasattr(state, "get") else None
        for key, value in (st or {}).items():
            if not torch.is_tensor(value) or value.shape != param.shape:
                continue
            if key in MOMENT_KEYS:
                tensors.append(value)
            elif key not in warned:
                warned.add(key)
                warnings.warn(
                    f"FlexLoRA does not know the optimizer state {key!r}; it is left unchanged "
                    f"for moved slots (reset only: {', '.join(MOMENT_KEYS)})",
                    stacklevel=4,
                )
        for t in tensors:
            loc, idx, _ = local_slots(t, dim, [slot])
            if idx:
                loc.select(dim, idx[0]).zero_()


def _bias(beta: float, n: int) -> float:
    return 1.0 - beta**n


class FreshSlots:
    """Birth steps of reset slots and the Adam/AdamW correction that makes them fresh.

    ``born[module][slot]`` is the tensor's optimizer step count when the slot was reset; only
    slots younger than their tensor (and not yet mature) are kept. Pure bookkeeping plus one
    post-hook; JSON-able through ``state_dict`` so a resumed run corrects exactly as before.
    """

    def __init__(self, modules: Mapping[str, FlexAdapter]) -> None:
        self.modules = modules
        self.born: dict[str, dict[int, int]] = {}
        self._groups: dict[int, dict] = {}

    @staticmethod
    def corrects(optimizer: Any) -> bool:
        """True for optimizers whose bias correction this class replaces (torch Adam, AdamW)."""
        return isinstance(optimizer, torch.optim.Adam)

    def record(self, name: str, slot: int, optimizer: Any) -> None:
        """Note that ``slot`` of ``name`` was just reset (before this step's optimizer.step)."""
        self.forget(name, slot)
        if not self.corrects(optimizer):
            return
        st = optimizer.state.get(self.modules[name].lambda_)
        k = int(st["step"]) if st and "step" in st else 0
        # The coming step (k + 1) applies the cleared, zero gradient: the slot's first real
        # gradient arrives at step k + 2, when it is 1 step old.
        self.born.setdefault(name, {})[slot] = k + 1

    def forget(self, name: str, slot: int) -> None:
        """Drop the record of one slot (pruned or re-reset)."""
        slots = self.born.get(name)
        if slots is not None:
            slots.pop(slot, None)
            if not slots:
                del self.born[name]

    def hook(self, optimizer: Any, args: Any = None, kwargs: Any = None) -> None:
        """``optimizer.register_step_post_hook`` target: correct every young slot's update."""
        if not self.born:
            return  # the common case: nothing to do, nothing touched
        if not self._groups:
            self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        mature = []
        for name, slots in self.born.items():
            done = self._correct_module(optimizer, self.modules[name], slots)
            mature += [(name, s) for s in done]
        for name, slot in mature:
            self.forget(name, slot)

    @torch.no_grad()
    def _correct_module(self, optimizer: Any, adapter: FlexAdapter, slots: dict[int, int]) -> set:
        mature = set(slots)
        for param, dim in slot_parts(adapter):
            st = optimizer.state.get(param)
            group = self._groups.get(id(param))
            if not st or "step" not in st or group is None:
                mature = set()  # not stepped (no gradient): keep the record for later
                continue
            k = int(st["step"])
            lr, eps = float(group["lr"]), float(group["eps"])
            beta1, beta2 = (float(b) for b in group["betas"])
            old = (lr / _bias(beta1, k), math.sqrt(_bias(beta2, k)))
            young, fresh = [], []
            for slot, born in slots.items():
                j = k - born
                if j <= 0:  # the birth step: zero moments, torch's update of the slot is 0
                    mature.discard(slot)
                    continue
                new = (lr / _bias(beta1, j), math.sqrt(_bias(beta2, j)))
                if not all(math.isclose(a, b, rel_tol=MATURE_RTOL) for a, b in zip(new, old)):
                    mature.discard(slot)
                    young.append(slot)
                    fresh.append(new)
            if young:
                v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
                _apply(param, st["exp_avg"], v, dim, young, fresh, old, eps)
        return mature


def _apply(
    param: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    dim: int,
    slots: list[int],
    fresh: list[tuple[float, float]],
    old: tuple[float, float],
    eps: float,
) -> None:
    """``param[slots] += u(j) − u(k)`` on this process's shard (see the module docstring)."""
    loc, idx, pos = local_slots(param, dim, slots)
    if not idx:
        return
    ml, vl = local_slots(m, dim, slots)[0], local_slots(v, dim, slots)[0]
    index = torch.tensor(idx, device=loc.device)
    a = torch.tensor([[fresh[i][0] for i in pos], [fresh[i][1] for i in pos]], device=loc.device)
    shape = [1] * loc.dim()
    shape[dim] = len(idx)
    step_j, sqrt_bc2_j = a[0].view(shape), a[1].view(shape)
    mm = ml.index_select(dim, index).float()
    sv = vl.index_select(dim, index).float().sqrt()
    corr = mm * (old[0] / (sv / old[1] + eps) - step_j / (sv / sqrt_bc2_j + eps))
    loc.index_add_(dim, index, corr.to(loc.dtype))
