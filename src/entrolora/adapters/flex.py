"""FlexAdapter: the SVD-form adapter of FlexLoRA, ``ΔW = (α/r₀)·P·diag(λ·mask)·Q`` (METHODS.md §5).

Capacity ``c`` slots are allocated once; a boolean buffer ``mask`` says which are active. Shapes
never change during training, so optimizers, ``torch.compile``, DDP and FSDP2 keep working;
the FlexLoRA controller (``entrolora.flex``) moves rank between modules by flipping mask bits.
Inactive slots are multiplied by 0 in the forward pass and the regulariser, so they contribute
nothing and receive exactly zero gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..plans import FLEX_INITS as INITS
from .base import kaiming_uniform
from .flex_ops import gram_distance, write_slot

PAPER_STD = 0.02  # AdaLoRA's and the FlexLoRA paper's N(0, 0.02²)


def new_directions(
    d_out: int, d_in: int, n: int, init: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` fresh directions ``(P cols (d_out, n), λ (n,), Q rows (n, d_in))``, float32, CPU.

    ``init="lora"`` (METHODS.md §5, revised): P = 0, λ = 1, Q Kaiming-uniform as LoRA's A (bound
    1/√d_in) — zero impact, and P learns exactly as LoRA's B. ``init="paper"``: λ = 0, P and Q
    ~ N(0, 0.02²) (AdaLoRA's convention, the paper's reading). Drawn from ``generator`` on the
    CPU so a seed gives the same directions on every device and process.
    """
    if init == "lora":
        q = kaiming_uniform((n, d_in), d_in, generator)
        return torch.zeros(d_out, n), torch.ones(n), q
    if init == "paper":
        p = torch.randn(d_out, n, generator=generator) * PAPER_STD
        q = torch.randn(n, d_in, generator=generator) * PAPER_STD
        return p, torch.zeros(n), q
    raise ValueError(f"unknown FlexLoRA init {init!r}; use one of {', '.join(INITS)}")


class FlexAdapter(nn.Module):
    """``delta(x) = ((x @ Qᵀ) · (λ·mask)) @ Pᵀ · α/r₀`` — METHODS.md §5.

    Parameters: P ``(d_out, c)``, λ ``(c)`` (attribute ``lambda_``), Q ``(c, d_in)``; buffer
    ``mask`` ``(c)`` bool, the first ``rank`` slots active, initialised by ``new_directions``
    with ``init`` ("lora", the default, or "paper"); inactive slots are all zeros. The scale
    α/r₀ is fixed at construction and does not follow the active rank.
    """

    kind = "flex"

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        capacity: int | None = None,
        lora_alpha: float = 16.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        init: str = "lora",
    ) -> None:
        super().__init__()
        capacity = 2 * rank if capacity is None else capacity
        if rank < 1:
            raise ValueError(f"FlexAdapter rank must be ≥ 1, got {rank}")
        if capacity < rank:
            raise ValueError(
                f"FlexAdapter capacity {capacity} is below its initial rank {rank}; "
                "use capacity ≥ rank (default 2·rank)"
            )
        if d_in < 1 or d_out < 1:
            raise ValueError(
                f"FlexAdapter needs positive dimensions, got d_in={d_in} d_out={d_out}"
            )
        self.d_in, self.d_out, self.r0, self.capacity = d_in, d_out, rank, capacity
        self.lora_alpha = float(lora_alpha)
        self.scale = self.lora_alpha / rank
        self.init = init
        mask = torch.zeros(capacity, dtype=torch.bool, device=device)
        mask[:rank] = True
        self.register_buffer("mask", mask, persistent=True)
        p0, lam0, q0 = new_directions(d_out, d_in, rank, init, generator)
        p, lam, q = torch.zeros(d_out, capacity), torch.zeros(capacity), torch.zeros(capacity, d_in)
        p[:, :rank], lam[:rank], q[:rank] = p0, lam0, q0
        self.P = nn.Parameter(p.to(device=device, dtype=dtype))
        self.lambda_ = nn.Parameter(lam.to(device=device, dtype=dtype))
        self.Q = nn.Parameter(q.to(device=device, dtype=dtype))

    # -- the function --------------------------------------------------------------------------
    def effective_lambda(self) -> torch.Tensor:
        """``λ·mask`` ``(c)``: the singular values that act, zeros in inactive slots."""
        # where() rather than λ·mask.float(): one kernel, and masked slots get exactly 0 gradient.
        return torch.where(self.mask, self.lambda_, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``, the adapter's contribution ``x @ ΔWᵀ``."""
        h = nn.functional.linear(x.to(self.Q.dtype), self.Q)  # (..., c)
        h = h * (self.effective_lambda() * self.scale)
        return nn.functional.linear(h, self.P).to(x.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW = scale·P·diag(λ·mask)·Q`` ``(d_out, d_in)``, scale included."""
        return (self.P * (self.effective_lambda() * self.scale)) @ self.Q

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, scale)`` of the active directions only (METHODS.md §5/§6).

        ``A = Q_active (r, d_in)``, ``B = P_active·diag(λ_active) (d_out, r)``, r the active rank;
        ``scale·B@A == delta_weight()``.
        """
        idx = self.active_slots()
        a = self.Q[idx]  # (r, d_in)
        b = self.P[:, idx] * self.lambda_[idx]  # (d_out, r)
        return a, b, self.scale

    def orthogonality(self) -> torch.Tensor:
        """``‖PₐᵀPₐ − I‖_F + ‖QₐQₐᵀ − I‖_F`` over active directions (METHODS §5, revised), float32.

        The same code as the controller's batched regulariser (``flex_ops.gram_distance``).
        """
        m = self.mask.to(torch.float32)[None]
        p = gram_distance(self.P.float()[None], m)
        q = gram_distance(self.Q.float().T[None], m)
        return (p + q)[0]

    # -- slots ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Number of active directions (reads the mask: one device sync)."""
        return int(self.mask.sum())

    def active_slots(self) -> torch.Tensor:
        """Indices of the active slots, ascending (``(r,)`` long)."""
        return self.mask.nonzero().flatten()

    @torch.no_grad()
    def deactivate(self, slot: int) -> None:
        """Prune ``slot``: mask it off and zero its λ, P column and Q row, so it is clean."""
        self.mask[slot] = False
        write_slot(self.lambda_, 0, slot, 0.0)
        write_slot(self.P, 1, slot, 0.0)
        write_slot(self.Q, 0, slot, 0.0)

    @torch.no_grad()
    def activate(
        self, slot: int, p_col: torch.Tensor, q_row: torch.Tensor, lam: float = 0.0
    ) -> None:
        """Expand into ``slot``: P column ``p_col``, Q row ``q_row``, λ ``lam``.

        Zero impact when ``p_col = 0`` or ``lam = 0`` (``new_directions`` gives either).
        """
        if p_col.shape != (self.d_out,) or q_row.shape != (self.d_in,):
            raise ValueError(
                f"activate needs p_col ({self.d_out},) and q_row ({self.d_in},); "
                f"got {tuple(p_col.shape)} and {tuple(q_row.shape)}"
            )
        if not math.isfinite(lam):
            raise ValueError(f"activate needs a finite λ, got {lam!r}")
        self.mask[slot] = True
        write_slot(self.lambda_, 0, slot, float(lam))
        write_slot(self.P, 1, slot, p_col)
        write_slot(self.Q, 0, slot, q_row)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, rank={self.r0}, capacity={self.capacity}, "
            f"scale={self.scale:g}, init={self.init}"
        )
