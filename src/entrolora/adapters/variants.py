"""DoRA, VeRA and LoRI adapters for the E²DoRA / E²VeRA / E²LoRI plans (METHODS.md §3).

As in ``lowrank``, ``inject.apply`` creates the factors and passes shared ones as the same tensor
to every member; frozen random matrices are buffers (saved with the adapter, never trained).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .base import base_weight
from .lowrank import LowRankAdapter, register


class DoRAAdapter(LowRankAdapter):
    """DoRA: ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row`` with ``ΔW = (α/r)·B·A`` (METHODS.md §3 E²DoRA).

    The direction factors A, B may be shared across an interval; the magnitude ``m`` ``(d_out)``
    is per layer, initialised as peft does to the row norms ``‖W + ΔW‖`` (norm over d_in for
    each output row). The norm is detached in the forward pass (DoRA §4.3, as peft). The
    adapter's output is ``x @ (W' − W)ᵀ``, so it needs the base weight: it keeps a plain
    (unregistered) reference to the base layer. ``lora_factors()`` returns the direction
    ``(A, B, scale)``; the full update is ``delta_weight()`` and the magnitude ``magnitude``.
    """

    kind = "dora"
    uses_base_output = True  # the wrapper may hand over base_layer(x) to save one matmul

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        rank: int,
        scale: float,
        base_layer: nn.Module,
        shared: dict[str, str] | None = None,
    ) -> None:
        super().__init__(A, B, rank, scale, shared)
        self.__dict__["_base_layer"] = base_layer  # not a submodule: not saved, not counted twice
        with torch.no_grad():
            norm = self._weight_norm(base_weight(base_layer))
        self.magnitude = nn.Parameter(norm.to(A.dtype))
        self._merge_norm: torch.Tensor | None = None

    def _lora_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scale  # (d_out, d_in)

    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        """``‖W + ΔW‖`` per output row, float32, no gradient ``(d_out,)``."""
        return torch.linalg.vector_norm(w.float() + self._lora_weight().detach().float(), dim=1)

    def _ratio(self, w: torch.Tensor) -> torch.Tensor:
        return self.magnitude.float() / self._weight_norm(w)  # (d_out,)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """``(s − 1)·(x Wᵀ) + s·(x ΔWᵀ)`` with ``s = m / ‖W + ΔW‖`` — DoRA's extra output."""
        w = base_weight(self._base_layer)
        s = self._ratio(w).to(self.A.dtype)  # (d_out,)
        if base_out is None:
            base_out = F.linear(x.to(w.dtype), w)  # (..., d_out), no bias
        lora = super().forward(x.to(self.A.dtype))  # (..., d_out), scale included
        return ((s - 1) * base_out.to(s.dtype) + s * lora).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = base_weight(self._base_layer).float()
        s = self._ratio(w)[:, None]
        return (s * (w + self._lora_weight().float()) - w).to(self.A.dtype)

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W' = s ⊙ (W + ΔW)`` for the wrapper's merge; remembers ‖W + ΔW‖ for unmerge."""
        self._merge_norm = self._weight_norm(w)
        s = (self.magnitude.float() / self._merge_norm)[:, None]
        return s * (w + self._lora_weight().float())

    def unmerged_weight(self, w_merged: torch.Tensor) -> torch.Tensor:
        """Inverse of ``merged_weight``: ``W = W' ⊙ ‖W + ΔW‖ / m − ΔW``."""
        norm = self._merge_norm
        if norm is None:  # merged in another process: ‖W'‖_row = m, the pre-merge norm is lost
            raise ValueError(
                "cannot unmerge a DoRA layer merged elsewhere; reload the base model and el.load"
            )
        self._merge_norm = None
        return w_merged * (norm / self.magnitude.float())[:, None] - self._lora_weight().float()


class VeRAAdapter(nn.Module):
    """VeRA: ``ΔW = diag(b)·B[:, :r]·diag(d[:r])·A[:r]`` (METHODS.md §3 E²VeRA; VeRA eq. 2).

    ``A`` ``(R, d_in)`` and ``B`` ``(d_out, R)`` are frozen random buffers shared by the module
    type, drawn as VeRA and peft draw them (Kaiming-uniform, gain √2: ``U(±√(6/fan_in))``);
    ``d`` ``(R_d,)`` (init 0.1, peft's ``d_initial``) and ``b`` ``(d_out,)`` (init 0) are
    trainable, shared per interval. A layer of rank r uses the first r rows/columns/entries.
    VeRA has no ``α/r`` factor: ``apply`` passes ``scale = 1`` (kept as an argument so that
    ``lora_factors`` has the common ``(A, B, scale)`` form).
    """

    kind = "vera"

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        d: torch.Tensor,
        b: torch.Tensor,
        rank: int,
        scale: float,
        shared: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if min(A.shape[0], B.shape[1], d.shape[0]) < rank or b.shape[0] != B.shape[0]:
            raise ValueError(
                f"VeRAAdapter of rank {rank} got A {tuple(A.shape)}, B {tuple(B.shape)}, "
                f"d {tuple(d.shape)}, b {tuple(b.shape)}"
            )
        for name, t in (("A", A), ("B", B), ("d", d), ("b", b)):
            register(self, name, t)
        self.rank, self.scale = rank, float(scale)
        self.d_in, self.d_out = A.shape[1], B.shape[0]
        self.shared = dict(shared or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        h = F.linear(x.to(self.d.dtype), self.A[:r]) * (self.d[:r] * self.scale)  # (..., r)
        return (F.linear(h, self.B[:, :r]) * self.b).to(x.dtype)  # (..., d_out)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``A = diag(d)·A`` ``(r, d_in)``, ``B = diag(b)·B`` ``(d_out, r)``."""
        r = self.rank
        return self.d[:r, None] * self.A[:r], self.b[:, None] * self.B[:, :r], self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b, scale = self.lora_factors()
        return (b @ a) * scale

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scale={self.scale:g}"


class LoRIAdapter(nn.Module):
    """LoRI: ``ΔW = (α/r)·(B ⊙ M)[:, :r]·A[:r]`` (METHODS.md §3 E²LoRI).

    ``A`` ``(R, d_in)`` is a frozen random buffer; ``B`` ``(d_out, R)`` is trainable under the
    fixed boolean mask ``M`` (a buffer of B's shape, shared with B). The mask is applied in the
    forward pass, so masked entries get exactly zero gradient and stay at their (zero) init.
    The mask comes from calibration magnitudes (``calibrate_lori_masks``), or is random.
    """

    kind = "lori"

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        mask: torch.Tensor,
        rank: int,
        scale: float,
        shared: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if mask.shape != B.shape or mask.dtype != torch.bool:
            raise ValueError(f"LoRI mask must be a bool tensor of B's shape {tuple(B.shape)}")
        if A.shape[0] < rank or B.shape[1] < rank:
            raise ValueError(f"rank {rank} exceeds A {tuple(A.shape)} or B {tuple(B.shape)}")
        for name, t in (("A", A), ("B", B), ("mask", mask)):
            register(self, name, t)
        self.rank, self.scale = rank, float(scale)
        self.d_in, self.d_out = A.shape[1], B.shape[0]
        self.shared = dict(shared or {})

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        r = self.rank
        return self.A[:r], (self.B * self.mask)[:, :r], self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, scale = self.lora_factors()
        h = F.linear(x.to(a.dtype), a) * scale  # (..., r)
        return F.linear(h, b).to(x.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        a, b, scale = self.lora_factors()
        return (b @ a) * scale

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scale={self.scale:g}"


def calibrate_lori_masks(
    adapters: Mapping[str, LoRIAdapter],
    gradients: Mapping[str, torch.Tensor],
    kept: Callable[[str, int], int],
) -> None:
    """Set every LoRI mask to B's entries of largest calibration magnitude, in place.

    B's first gradient is ``∂L/∂B = s·G·Aᵀ`` (``ΔW = s·B·A`` and ``∂L/∂ΔW = G``, the probe's
    mean gradient ``(d_out, d_in)``); for a B shared by several layers it is the sum over them,
    ``Σ_l s_l·G_l·A_lᵀ[:, :r_l]``. The mask keeps ``kept(first member's name, B.numel())``
    entries of largest ``|∂L/∂B|`` (LoRI's magnitude mask, METHODS.md §3; ties: lower flat
    index first).
    Computed in float64 on the CPU, so every process gets the same mask.
    """
    members: dict[int, list[tuple[str, LoRIAdapter]]] = {}
    for name, a in adapters.items():
        members.setdefault(id(a.mask), []).append((name, a))
    for group in members.values():
        mask = group[0][1].mask
        score = torch.zeros(mask.shape, dtype=torch.float64)  # (d_out, R)
        for name, a in group:
            g = gradients[name].detach().to("cpu", torch.float64)  # (d_out, d_in)
            at = a.A[: a.rank].detach().to("cpu", torch.float64).T  # (d_in, r)
            score[:, : a.rank] += a.scale * (g @ at)
        order = torch.argsort(score.abs().flatten(), descending=True, stable=True)
        new = torch.zeros(mask.numel(), dtype=torch.bool)
        new[order[: kept(group[0][0], mask.numel())]] = True
        with torch.no_grad():
            mask.copy_(new.view(mask.shape))
