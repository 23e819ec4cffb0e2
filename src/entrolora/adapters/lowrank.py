"""Low-rank adapters: plain / shared / sliced ``B·A`` and block-diagonal (MELoRA) ``diag(B_i·A_i)``.

Factors are handed in by ``inject.apply`` (which creates them, seeded, and passes the
*same* ``nn.Parameter`` to every member of a shared group), so sharing is real: one tensor, one
gradient, one optimizer state. A member of rank ``r`` below its group's stored rank uses the first
r rows of A and the first r columns of B (the E²ShareLoRA slice, METHODS.md §3).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def register(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Attach ``tensor``: an ``nn.Parameter`` as a parameter, anything else as a saved buffer."""
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor, persistent=True)


class LowRankAdapter(nn.Module):
    """``ΔW = (α/r)·B[:, :r]·A[:r]`` (LoRA, METHODS.md §3/§4; shared factors and slices alike).

    ``A`` ``(R, d_in)`` and ``B`` ``(d_out, R)`` with ``R ≥ rank``; ``scale = lora_alpha / rank``
    with the adapter's own rank. ``shared`` maps a factor name to its group id (for saving).
    """

    kind = "lora"

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        rank: int,
        scale: float,
        shared: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if A.shape[0] < rank or B.shape[1] < rank or A.ndim != 2 or B.ndim != 2:
            raise ValueError(
                f"LowRankAdapter needs A (≥{rank}, d_in) and B (d_out, ≥{rank}); "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        register(self, "A", A)
        register(self, "B", B)
        self.rank, self.scale = rank, float(scale)
        self.d_in, self.d_out = A.shape[1], B.shape[0]
        self.shared = dict(shared or {})

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``(A (r, d_in), B (d_out, r))`` (views of the stored tensors)."""
        return self.A[: self.rank], self.B[:, : self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        h = F.linear(x.to(a.dtype), a) * self.scale  # (..., r)
        return F.linear(h, b).to(x.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.factors()
        return a, b, self.scale

    def extra_repr(self) -> str:
        shared = f", shared={self.shared}" if self.shared else ""
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scale={self.scale:g}{shared}"
        )


class BlockDiagonalAdapter(nn.Module):
    """``ΔW = (α/r)·diag(B_1A_1, …, B_nA_n)`` (MELoRA / RaLoRA, METHODS.md §4).

    ``A`` ``(n, R, d_in/n)``, ``B`` ``(n, d_out/n, R)``, R ≥ rank; block i maps input slice i to
    output slice i. Parameters ``r·(d_in + d_out)`` for any n, equivalent rank ``n·r``. The forward
    pass is two batched einsums over all blocks at once (no Python loop), for any leading shape.
    """

    kind = "lora"

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        rank: int,
        scale: float,
        shared: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
            raise ValueError(
                "BlockDiagonalAdapter needs A (blocks, R, d_in/blocks) and B (blocks, d_out/blocks,"
                f" R) with the same block count; got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        if A.shape[1] < rank or B.shape[2] < rank:
            raise ValueError(f"rank {rank} exceeds the stored rank of A {tuple(A.shape)}")
        register(self, "A", A)
        register(self, "B", B)
        self.rank, self.scale = rank, float(scale)
        self.blocks = A.shape[0]
        self.d_in, self.d_out = A.shape[0] * A.shape[2], B.shape[0] * B.shape[1]
        self.shared = dict(shared or {})

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (n, r, d_in/n), B (n, d_out/n, r))`` at this layer's rank."""
        return self.A[:, : self.rank], self.B[:, :, : self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        lead = x.shape[:-1]
        xb = x.to(a.dtype).reshape(-1, self.blocks, self.d_in // self.blocks)  # (t, n, d_in/n)
        h = torch.einsum("tnk,nrk->tnr", xb, a) * self.scale  # (t, n, r)
        y = torch.einsum("tnr,nor->tno", h, b)  # (t, n, d_out/n)
        return y.reshape(*lead, self.d_out).to(x.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        blocks = torch.bmm(b, a) * self.scale  # (n, d_out/n, d_in/n)
        return _block_diag(blocks)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Materialised ``A = diag(A_i)`` ``(n·r, d_in)``, ``B = diag(B_i)`` ``(d_out, n·r)``."""
        a, b = self.factors()
        return _block_diag(a), _block_diag(b), self.scale

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, blocks={self.blocks}, "
            f"scale={self.scale:g}"
        )


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """``(n, p, q)`` blocks → the dense ``(n·p, n·q)`` block-diagonal matrix, without a loop."""
    n, p, q = blocks.shape
    out = blocks.new_zeros(n, p, n, q)  # (block row, p, block col, q)
    idx = torch.arange(n, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(n * p, n * q)
