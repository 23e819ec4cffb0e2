"""Optimizer state of FlexLoRA's moved slots (METHODS.md §5): reset, then start like a fresh one.

A pruned or expanded slot gets its gradient and its per-element moments zeroed. That is not yet
a fresh start under Adam: PyTorch keeps one step count ``k`` per tensor, so the slot's zeroed
moments are bias-corrected with ``1 − β^k`` (≈ 1) instead of the ``1 − β^j`` of a parameter
that is ``j`` steps old, and its first updates come out several times the learning rate.
``FreshSlots`` counts each reset slot's age ``j`` (0 after the step that applies its cleared
gradient) and its tensor's step count ``k`` and, in a post-hook of ``optimizer.step()``,
replaces the update torch applied to that slot by the one a fresh Adam/AdamW would have applied
(same moments, bias correction of age ``j``):

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

from ..adapters.flex import FlexAdapter
from ..adapters.flex_ops import local_slots

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
    """Ages of reset slots and the Adam/AdamW correction that makes them fresh.

    ``young[module][slot] = [j, k]``: the slot's age ``j`` and its tensor's step count ``k``
    after the last optimizer step, both counted here (one hook call = one step), so the hook
    never reads a device value. Mature slots leave; JSON-able through ``state_dict`` so a
    resumed run corrects exactly as an uninterrupted one.
    """

    def __init__(self, modules: Mapping[str, FlexAdapter]) -> None:
        self.modules = modules
        self.young: dict[str, dict[int, list[int]]] = {}
        self._groups: dict[int, dict] = {}

    @staticmethod
    def corrects(optimizer: Any) -> bool:
        """True for optimizers whose bias correction this class replaces (torch Adam, AdamW)."""
        return isinstance(optimizer, torch.optim.Adam)

    def record(self, name: str, slot: int, optimizer: Any) -> None:
        """Note that ``slot`` of ``name`` was just reset (before this step's optimizer.step).

        Reads the tensor's step count: one host read on an adjustment step.
        """
        self.forget(name, slot)
        if not self.corrects(optimizer):
            return
        st = optimizer.state.get(self.modules[name].lambda_)
        k = int(st["step"]) if st and "step" in st else 0
        # The coming step applies the cleared, zero gradient (age 0 after it, no update: the
        # moments are 0); the slot's first real gradient arrives one step later, at age 1.
        self.young.setdefault(name, {})[slot] = [-1, k]

    def forget(self, name: str, slot: int) -> None:
        """Drop the record of one slot (pruned or re-reset)."""
        slots = self.young.get(name)
        if slots is not None:
            slots.pop(slot, None)
            if not slots:
                del self.young[name]

    def hook(self, optimizer: Any, args: Any = None, kwargs: Any = None) -> None:
        """``optimizer.register_step_post_hook`` target: correct every young slot's update.

        One batch of ``torch._foreach_*`` calls for all young slots together (a few kernels per
        step, however many slots are young), factors as Python numbers: no device read.
        """
        if not self.young:
            return  # the common case: nothing to do, nothing touched
        if not self._groups:
            self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        batch = _Batch()
        mature = []
        for name, slots in self.young.items():
            adapter = self.modules[name]
            group = self._groups[id(adapter.lambda_)]
            for slot, age in slots.items():
                age[0] += 1
                age[1] += 1
                if batch.add(optimizer.state, group, adapter, slot, *age):
                    mature.append((name, slot))
        batch.apply()
        for name, slot in mature:
            self.forget(name, slot)


def _bias(beta: float, n: int) -> float:
    return 1.0 - beta**n


class _Batch:
    """The young slots' views of param, m, v̂ and their factors, corrected together."""

    def __init__(self) -> None:
        self.p: list[torch.Tensor] = []
        self.m: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.f: list[tuple[float, float, float, float, float]] = []

    def add(self, state: Any, group: dict, adapter: FlexAdapter, slot: int, j: int, k: int) -> bool:
        """Queue ``slot``'s views on this process's shard; True once the slot is mature (both
        bias corrections agree to ``MATURE_RTOL``). Age ``j ≤ 0`` is the step that applied the
        cleared gradient: zero moments, nothing to correct."""
        if j <= 0:
            return False
        lr, eps = float(group["lr"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        old = (lr / _bias(beta1, k), math.sqrt(_bias(beta2, k)))
        new = (lr / _bias(beta1, j), math.sqrt(_bias(beta2, j)))
        if all(math.isclose(a, b, rel_tol=MATURE_RTOL) for a, b in zip(new, old)):
            return True
        v_key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        for param, dim in slot_parts(adapter):
            st = state.get(param)
            if not st or v_key not in st:
                continue
            loc, idx, _ = local_slots(param, dim, [slot])
            if idx:
                self.p.append(loc.select(dim, idx[0]))
                self.m.append(local_slots(st["exp_avg"], dim, [slot])[0].select(dim, idx[0]))
                self.v.append(local_slots(st[v_key], dim, [slot])[0].select(dim, idx[0]))
                self.f.append((*old, *new, eps))
        return False

    @torch.no_grad()
    def apply(self) -> None:
        """``param += m·(a_k/(√v̂/b_k + eps) − a_j/(√v̂/b_j + eps))`` = ``u(j) − u(k)``, with
        ``a_n = lr/(1 − β₁ⁿ)``, ``b_n = √(1 − β₂ⁿ)``, in the parameters' dtype as torch's step."""
        if not self.p:
            return
        a_k, b_k, a_j, b_j, eps = (list(x) for x in zip(*self.f))
        sv = torch._foreach_sqrt(self.v)
        old = torch._foreach_div(sv, b_k)
        torch._foreach_add_(old, eps)
        torch._foreach_reciprocal_(old)
        torch._foreach_mul_(old, a_k)
        new = torch._foreach_div(sv, b_j)
        torch._foreach_add_(new, eps)
        torch._foreach_reciprocal_(new)
        torch._foreach_mul_(new, a_j)
        torch._foreach_sub_(old, new)
        torch._foreach_mul_(old, self.m)
        torch._foreach_add_(self.p, old)
