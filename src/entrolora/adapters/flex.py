"""FlexAdapter: the SVD-form adapter of FlexLoRA, ``ΔW = (α/r₀)·P·diag(λ·mask)·Q`` (METHODS.md §5).

Capacity ``c`` slots are allocated once; a boolean buffer ``mask`` says which are active. Shapes
never change during training, so optimizers, ``torch.compile``, DDP/FSDP and ZeRO keep working;
the FlexLoRA controller (``entrolora.flex``) moves rank between modules by flipping mask bits.
Inactive slots are multiplied by 0 in the forward pass and the regulariser, so they contribute
nothing and receive exactly zero gradient.
"""

from __future__ import annotations

import torch
from torch import nn


class FlexAdapter(nn.Module):
    """``delta(x) = ((x @ Qᵀ) · (λ·mask)) @ Pᵀ · α/r₀`` — METHODS.md §5.

    Parameters: P ``(d_out, c)``, λ ``(c)`` (attribute ``lambda_``), Q ``(c, d_in)``; buffer
    ``mask`` ``(c)`` bool, the first ``rank`` slots active. Init (AdaLoRA's convention): λ = 0,
    active P columns / Q rows ~ N(0, init_std²); inactive slots are all zeros. The scale α/r₀ is
    fixed at construction and does not follow the active rank.
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
        init_std: float = 0.02,
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
        mask = torch.zeros(capacity, dtype=torch.bool, device=device)
        mask[:rank] = True
        self.register_buffer("mask", mask, persistent=True)
        # Draw on the CPU (the generator's device) so a seed gives the same init on any device.
        p = torch.randn(d_out, capacity, generator=generator) * init_std
        q = torch.randn(capacity, d_in, generator=generator) * init_std
        keep = mask.cpu().to(p.dtype)
        self.P = nn.Parameter((p * keep).to(device=device, dtype=dtype))
        self.lambda_ = nn.Parameter(torch.zeros(capacity, device=device, dtype=dtype))
        self.Q = nn.Parameter((q * keep[:, None]).to(device=device, dtype=dtype))

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
        """``‖PₐᵀPₐ − I‖²_F + ‖QₐQₐᵀ − I‖²_F`` over active directions (METHODS §5 eq. 2), float32.

        Masking zeroes the inactive rows/columns of both Gram matrices and of the identity, so
        the full ``c×c`` computation equals the active-only one without gathering slots.
        """
        m = self.mask.to(torch.float32)
        p = self.P.float() * m  # (d_out, c)
        q = self.Q.float() * m[:, None]  # (c, d_in)
        eye = torch.diag(m)
        return ((p.T @ p - eye) ** 2).sum() + ((q @ q.T - eye) ** 2).sum()

    @torch.no_grad()
    def orthogonality_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Analytic gradients of ``orthogonality()`` w.r.t. P and Q, in the parameters' dtype.

        ``∂/∂P = 4·Pₐ(PₐᵀPₐ − I)``, ``∂/∂Q = 4·(QₐQₐᵀ − I)Qₐ`` (inactive slots get 0). Used where
        the regulariser cannot join the loss (the Trainer callback), without a second backward.
        """
        m = self.mask.to(torch.float32)
        p = self.P.float() * m
        q = self.Q.float() * m[:, None]
        eye = torch.diag(m)
        gp = 4 * p @ (p.T @ p - eye)
        gq = 4 * (q @ q.T - eye) @ q
        return gp.to(self.P.dtype), gq.to(self.Q.dtype)

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
        self.lambda_[slot] = 0
        self.P[:, slot] = 0
        self.Q[slot, :] = 0

    @torch.no_grad()
    def activate(self, slot: int, p_col: torch.Tensor, q_row: torch.Tensor) -> None:
        """Expand into ``slot`` with zero impact: λ = 0, P column ``p_col``, Q row ``q_row``."""
        if p_col.shape != (self.d_out,) or q_row.shape != (self.d_in,):
            raise ValueError(
                f"activate needs p_col ({self.d_out},) and q_row ({self.d_in},); "
                f"got {tuple(p_col.shape)} and {tuple(q_row.shape)}"
            )
        self.mask[slot] = True
        self.lambda_[slot] = 0
        self.P[:, slot] = p_col.to(self.P)
        self.Q[slot, :] = q_row.to(self.Q)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, rank={self.r0}, capacity={self.capacity}, "
            f"scale={self.scale:g}"
        )
