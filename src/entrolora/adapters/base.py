"""The adapter protocol and the wrapper that puts an adapter next to a frozen linear layer.

Every adapter is an ``nn.Module`` with (torchtune-style protocol, no mixin tree):

- ``forward(x) -> delta``: ``(..., d_in) -> (..., d_out)``, the adapter's contribution ``x @ ΔWᵀ``;
- ``delta_weight() -> ΔW`` ``(d_out, d_in)``, scale included;
- ``lora_factors() -> (A (r, d_in), B (d_out, r), scale)`` with ``scale·B@A == delta_weight()``
  (per module, dense, materialised: block-diagonal → rank n·r, shared → this layer's slice).

``AdaptedLinear`` replaces the target module in its parent: ``base_layer`` keeps the original
``nn.Linear`` / ``Conv1D`` (weight untouched until an explicit ``merge``), ``adapter`` holds the
adapter; ``forward(x) = base_layer(x) + adapter(dropout(x))``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..targets import is_conv1d, linear_dims


@runtime_checkable
class Adapter(Protocol):
    """What ``inject``, ``io`` and the FlexLoRA controller rely on (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def delta_weight(self) -> torch.Tensor: ...

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]: ...


def kaiming_uniform(
    shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None, a: float = math.sqrt(5)
) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(a=a)`` of a ``shape`` tensor, float32 on the CPU.

    ``a = √5`` (default) is peft's LoRA A init, ``U(−1/√fan_in, 1/√fan_in)`` (METHODS.md §4);
    ``a = 0`` is VeRA's, ``U(−√(6/fan_in), √(6/fan_in))``. Drawn on the CPU from ``generator``
    so a seed gives the same tensor on any device and in every process. Filled as a 2-D view
    ``(numel / fan_in, fan_in)``, so a block stack ``(n, r, d_in/n)`` gets fan-in ``d_in/n``.
    """
    t = torch.empty(math.prod(shape) // fan_in, fan_in)
    nn.init.kaiming_uniform_(t, a=a, generator=generator)
    return t.view(shape)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as ``(d_out, d_in)`` (a view: Conv1D stores ``(d_in, d_out)``)."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


class AdaptedLinear(nn.Module):
    """``y = base_layer(x) + adapter(dropout(x))``; after ``merge()`` just ``base_layer(x)``.

    Merging is explicit (litgpt's ``merged`` flag): ``merge`` adds ΔW into the base weight once,
    merging twice changes nothing, ``unmerge`` takes it out again; ``train()``/``eval()`` never
    touch weights. While merged the adapter is bypassed, so it receives no gradient.
    """

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.adapter = adapter
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.d_in, self.d_out = linear_dims(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `.weight.dtype` / `.weight.device` of its projections.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        if getattr(self.adapter, "uses_base_output", False) and isinstance(
            self.dropout, nn.Identity
        ):
            # DoRA rescales W·x: hand it the base output (bias removed) instead of recomputing it
            bias = self.bias
            base_out = out if bias is None else out - bias
            return out + self.adapter(x, base_out=base_out).to(out.dtype)
        return out + self.adapter(self.dropout(x)).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (in float32, stored in the base dtype); idempotent."""
        if self.merged:
            return
        w = base_weight(self.base_layer)  # (d_out, d_in) view of the stored weight
        merge_into = getattr(self.adapter, "merged_weight", None)
        if merge_into is not None:  # DoRA: the merged weight is not W + ΔW of a fixed ΔW
            new = merge_into(w.float())
        else:
            new = w.float() + self.adapter.delta_weight().float().to(w.device)
        w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base weight; a no-op when not merged."""
        if not self.merged:
            return
        w = base_weight(self.base_layer)
        unmerge_from = getattr(self.adapter, "unmerged_weight", None)
        if unmerge_from is not None:
            new = unmerge_from(w.float())
        else:
            new = w.float() - self.adapter.delta_weight().float().to(w.device)
        w.copy_(new.to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, merged={self.merged}"
