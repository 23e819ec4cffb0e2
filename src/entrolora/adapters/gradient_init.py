"""``init="gradient"`` (METHODS.md §7): A's rows along the signal gradient's top right singular
directions, B = 0.

For a module with probed gradient ``G`` and noise estimate ``D`` (``d_out × d_in``), the rows of
``A_m`` are the top-``r_m`` eigenvectors of the input-side signal Gram ``N = GᵀG − DᵀD``
(``GᵀG`` without a noise estimate), scaled to the Frobenius norm that LoRA's Kaiming-uniform
draw of ``A`` has in expectation. The output is unchanged at step 0 (B = 0), and the first
update of B, ``−η·s·Ĝ·Aᵀ`` for a weight gradient ``Ĝ``, moves ``ΔW = s·B·A`` by
``−η·s²·Ĝ·AᵀA``: the gradient step projected on those directions.

Computing the eigenvectors: ``N = Xᵀ J X`` with ``X = [G; D]`` (``2·d_out × d_in``) and
``J = diag(I, −I)``. When ``d_in ≤ 2·d_out``, ``N`` itself (``d_in × d_in``) goes to ``eigh``.
Otherwise its range lies in the row space of ``X``: with ``Xᵀ = Q R`` (``Q``: ``d_in × 2·d_out``,
orthonormal columns), ``N = Q (QᵀNQ) Qᵀ`` and ``QᵀNQ = (GQ)ᵀ(GQ) − (DQ)ᵀ(DQ)`` is small, so the
eigenvectors are ``Q·U`` for ``QᵀNQ = U Λ Uᵀ``. (The smaller-side Gram ``GGᵀ − DDᵀ`` mapped
through ``Gᵀ`` would be right only without noise: ``DᵀD`` does not act on ``G``'s rows alone.)
Float64, on the base layer's device; every process computes the same from the same statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

INIT_KINDS = ("lora", "dora")


def init_mode(plan: Any) -> str:
    """The plan's ``init`` option for low-rank modules: ``"gradient"`` or ``"lora"``."""
    return "gradient" if plan.options.get("init") == "gradient" else "lora"


def kaiming_norm(rank: int, d_in: int, a: float = math.sqrt(5)) -> float:
    """Expected Frobenius norm of ``kaiming_uniform((rank, d_in), d_in, a=a)``: entries
    ``U(−b, b)`` with ``b² = 6/((1 + a²)·d_in)``, variance ``b²/3``."""
    bound2 = 6.0 / ((1.0 + a * a) * d_in)
    return math.sqrt(rank * d_in * bound2 / 3.0)


def signal_right_vectors(
    g: torch.Tensor, d: torch.Tensor | None, rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Top-``rank`` eigenvectors of ``GᵀG − DᵀD`` (``GᵀG`` when ``d`` is None) as the rows of a
    ``(rank, d_in)`` float64 tensor on ``device``, by falling eigenvalue; each row's largest
    entry positive, so that the result does not depend on the eigensolver's signs."""
    device = g.device if device is None else torch.device(device)
    g = g.detach().to(device=device, dtype=torch.float64)
    x = g if d is None else torch.cat([g, d.detach().to(device=device, dtype=torch.float64)])
    d_out, d_in = g.shape
    if rank > d_in:
        raise ValueError(f"rank {rank} exceeds d_in {d_in}")
    if d_in <= x.shape[0]:
        n = g.mT @ g
        if d is not None:
            n = n - x[d_out:].mT @ x[d_out:]
        vals, vecs = torch.linalg.eigh(n)  # ascending
    else:
        q, _ = torch.linalg.qr(x.mT)  # (d_in, rows): the row space of G and D
        gq = g @ q
        small = gq.mT @ gq
        if d is not None:
            dq = x[d_out:] @ q
            small = small - dq.mT @ dq
        vals, u = torch.linalg.eigh(small)
        vecs = q @ u
    top = vecs[:, torch.argsort(vals, descending=True, stable=True)[:rank]].mT.contiguous()
    sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    return top * torch.where(sign == 0, torch.ones_like(sign), sign)


def gradient_factors(
    plan: Any, stats: Any, devices: Mapping[str, torch.device] | None = None
) -> dict[str, torch.Tensor] | None:
    """``{module name: A (rank, d_in)}`` (float64) for a plan whose ``init`` is ``"gradient"``,
    else None. ``stats``: GradientStats holding the probe's gradients (and noise estimates);
    ``devices``: where each module's eigenvectors are computed (default: the gradient's). A plan
    made from the raw statistics (``options["statistics"] == "raw"``) reads G alone.
    ValueError (before any model is touched) for a module whose A is shared or block-diagonal,
    or whose gradient the statistics do not hold."""
    if init_mode(plan) != "gradient":
        return None
    grads = getattr(stats, "gradients", None) or {}
    # a plan that read the raw statistics takes G's own directions
    raw = plan.options.get("statistics") == "raw"
    noise = {} if raw else (getattr(stats, "noise", None) or {})
    out = {}
    for name, m in plan.modules.items():
        if m.kind not in INIT_KINDS or m.blocks != 1 or "A" in m.shared:
            raise ValueError(
                f"init='gradient' sets A of plain low-rank modules; {name!r} is {m.kind} with "
                f"{m.blocks} block(s){' and a shared A' if 'A' in m.shared else ''}: plan it "
                "with init='lora'"
            )
        if name not in grads:
            raise ValueError(
                f"init='gradient' needs the probed gradient of {name!r}: pass "
                "el.apply(model, plan, stats=stats) with statistics that keep their gradients "
                "(el.probe does; a statistics file needs --keep-gradients), or plan with "
                "init='lora'"
            )
        dev = (devices or {}).get(name)
        v = signal_right_vectors(grads[name], noise.get(name), m.rank, dev)
        out[name] = v * (kaiming_norm(m.rank, m.d_in) / math.sqrt(m.rank))
    return out
