"""Effective rank (gradient intrinsic dimensionality, RaLoRA eq. 3) computed batched.

Singular values come from the eigenvalues of the smaller Gram matrix (``G Gᵀ`` or ``Gᵀ G``) in
float64: one batched matmul and one batched ``eigvalsh`` per group of same-shape gradients, on
whatever device the gradients live. Squaring doubles the condition number, but the directions it
blurs have singular values below ~1e-8·σ_max, whose weight in the L1-normalised distribution is
negligible, so the result stays within 1 % of a float64 SVD.

Signal effective rank (METHODS.md §2, "Probe noise"): given the probe's noise estimate ``D`` for
each gradient, the Gram of the smaller side becomes ``M = G Gᵀ − D Dᵀ`` (unbiased for ``μ μᵀ``);
``M`` is symmetric but not PSD, so its eigenvalues are clipped at 0 before the square root.

Large matrices (smaller side ≥ ``FAST_MIN_SIDE``): ``slq.erank_estimate`` estimates the raw
statistic from products with G only (deflated stochastic Lanczos quadrature: within 1 % on a
noise floor and for ~95 % of real gradients' steeply decaying spectra, up to ~2 % on the rest,
bench/speed/erank.py), which avoids both the Gram product and its eigenvalues.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import slq
from .singular import erank_from_singular_values, gram, singular_values, sqrt_eig

# Smaller side from which ``effective_ranks`` estimates instead of computing exactly: there the
# estimator is several times faster than the Gram eigenvalues (bench/speed/erank.py); below, exact
# is cheap and the estimator would span most of the space anyway.
FAST_MIN_SIDE = 2048


def _check(grads: Sequence[torch.Tensor], noises: Sequence[torch.Tensor] | None) -> None:
    for g in grads:
        if g.dim() != 2:
            raise ValueError(f"effective rank needs 2-D matrices, got shape {tuple(g.shape)}")
    if noises is None:
        return
    if len(noises) != len(grads):
        raise ValueError(
            f"got {len(noises)} noise estimates for {len(grads)} gradients; pass one D per G"
        )
    for i, (g, d) in enumerate(zip(grads, noises)):
        if tuple(d.shape) != tuple(g.shape):
            raise ValueError(
                f"noise estimate {i} has shape {tuple(d.shape)} but its gradient "
                f"{tuple(g.shape)}; pass D with the gradient's shape"
            )


def effective_ranks(
    grads: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor] | None = None,
    max_batch_bytes: int = 2**30,
    device: torch.device | str | None = None,
    *,
    method: str = "auto",
    fast_min_side: int = FAST_MIN_SIDE,
    seed: int = 0,
) -> list[float]:
    """Effective rank (RaLoRA eq. 3) of each 2-D gradient, in input order (NaN if all-zero).

    ``noises``: the probe's noise estimate ``D`` for each gradient (same shapes); then the
    *signal* effective rank, from the clipped eigenvalues of ``G Gᵀ − D Dᵀ`` (METHODS.md §2,
    probe noise); NaN where no signal is left (all eigenvalues ≤ 0). ``method="exact"``:
    float64 Gram eigenvalues; same-shape gradients are stacked and processed together, at most
    ``max_batch_bytes`` of float64 at a time so that memory stays bounded on large models.
    ``"fast"``: ``slq.erank_estimate`` (from products with G only, seeded by ``seed``: within 1 %
    of exact for the raw statistic on a noise floor and for ~95 % of real gradients' steeply
    decaying spectra, up to ~2 % on the rest; a few per cent for the signal); ``"auto"``
    (default): fast for the raw statistic where the smaller side is ≥ ``fast_min_side``, exact
    otherwise.
    ``device``: where to compute (default: where each gradient lives). Raises ValueError on a
    non-2-D matrix, a noise list that does not match or an unknown method.
    """
    _check(grads, noises)
    if method not in ("auto", "exact", "fast"):
        raise ValueError(f"method must be 'auto', 'exact' or 'fast', got {method!r}")
    out: list[float] = [float("nan")] * len(grads)
    copies = 1 if noises is None else 2
    for (shape, dev), idx in _shape_groups(grads, device).items():
        auto_fast = noises is None and min(shape) >= fast_min_side  # see FAST_SIGNAL
        if method == "fast" or (method == "auto" and auto_fast):
            for i in idx:
                d = None if noises is None else noises[i].to(dev)
                out[i] = slq.erank_estimate(grads[i].to(dev), d, seed=seed)
            continue
        for part in _chunks(idx, shape, copies, copies, max_batch_bytes):
            batch, noise = _stack64(grads, part, dev), _stack64(noises, part, dev)
            eranks = erank_from_singular_values(singular_values(batch, noise))
            for i, e in zip(part, eranks.tolist()):
                out[i] = e
    return out


def raw_and_signal_eranks(
    grads: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor],
    max_batch_bytes: int = 2**30,
    device: torch.device | str | None = None,
    *,
    fast_min_side: int = FAST_MIN_SIDE,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """``(effective_ranks(grads), effective_ranks(grads, noises))`` with the same defaults and
    the same values, for less work: each shape group is stacked and converted to float64 once,
    the signal Gram reuses the raw one (``M = G Gᵀ − D Dᵀ``) and one batched ``eigvalsh`` takes
    both. Where the raw statistic is estimated (smaller side ≥ ``fast_min_side``), only the
    signal's eigenvalues are computed exactly.
    """
    found = spectra_and_eranks(
        grads, noises, 0, max_batch_bytes, device, fast_min_side=fast_min_side, seed=seed
    )
    return found.raw_erank, found.signal_erank


@dataclass
class Spectra:
    """Per gradient, in input order: effective ranks (raw, and of the signal when noise was
    given, NaN where none is left) and the top singular values, descending, float64 (raw: None
    where the raw statistic was estimated; signal: None without noise)."""

    raw_erank: list[float]
    signal_erank: list[float] | None
    raw_sv: list[list[float] | None]
    signal_sv: list[list[float] | None]


def spectra_and_eranks(
    grads: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor] | None,
    keep: int = 0,
    max_batch_bytes: int = 2**30,
    device: torch.device | str | None = None,
    *,
    fast_min_side: int = FAST_MIN_SIDE,
    seed: int = 0,
) -> Spectra:
    """Effective ranks as ``raw_and_signal_eranks`` (``effective_ranks`` without ``noises``) and
    the top ``keep`` singular values of each G and of its signal (METHODS.md §2: square roots of
    the clipped eigenvalues of ``G Gᵀ − D Dᵀ``), all from the same eigenvalues: nothing is
    computed twice. Raw singular values are missing where the raw statistic is estimated."""
    _check(grads, noises)
    n = len(grads)
    raw: list[float] = [float("nan")] * n
    signal: list[float] | None = None if noises is None else [float("nan")] * n
    raw_sv: list[list[float] | None] = [None] * n
    signal_sv: list[list[float] | None] = [None] * n
    copies, grams = (1, 1) if noises is None else (2, 4)  # G, D; A, DDᵀ, M, both
    for (shape, dev), idx in _shape_groups(grads, device).items():
        fast = min(shape) >= fast_min_side
        for part in _chunks(idx, shape, copies, grams, max_batch_bytes):
            if fast and noises is None:  # the raw statistic alone, estimated: no eigenvalues
                for i in part:
                    raw[i] = slq.erank_estimate(grads[i].to(dev), seed=seed)
                continue
            g, d = _stack64(grads, part, dev), _stack64(noises, part, dev)
            a = gram(g)  # (b, k, k)
            if d is None:
                sv = sqrt_eig(a)
            else:
                m = a - gram(d)
                sv = sqrt_eig(m if fast else torch.cat([a, m]))  # (b or 2b, k)
                del m
            del g, d, a
            eranks = erank_from_singular_values(sv).tolist()
            top = sv[:, :keep].tolist() if keep else [None] * len(sv)
            for j, i in enumerate(part):
                if signal is not None:
                    signal[i], signal_sv[i] = eranks[j - len(part)], top[j - len(part)]
                if fast:
                    raw[i] = slq.erank_estimate(grads[i].to(dev), seed=seed)
                else:
                    raw[i], raw_sv[i] = eranks[j], top[j]
    return Spectra(raw, signal, raw_sv, signal_sv)


def _shape_groups(
    grads: Sequence[torch.Tensor], device: torch.device | str | None
) -> dict[tuple[tuple[int, ...], torch.device], list[int]]:
    """Indices of the gradients per (shape, device where they are computed), in input order."""
    groups: dict[tuple[tuple[int, ...], torch.device], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        groups[(tuple(g.shape), g.device if device is None else torch.device(device))].append(i)
    return groups


def _chunks(idx: list[int], shape: tuple[int, ...], mats: int, grams: int, max_bytes: int):
    """``idx`` in slices whose float64 stacks (``mats`` copies of the matrices, ``grams`` of
    their Grams) stay under ``max_bytes``: memory stays bounded on large models."""
    per = 8 * shape[0] * shape[1] * mats + 8 * min(shape) ** 2 * grams
    chunk = max(1, max_bytes // per)
    return [idx[start : start + chunk] for start in range(0, len(idx), chunk)]


def _stack64(mats: Sequence[torch.Tensor] | None, part: list[int], dev) -> torch.Tensor | None:
    """``mats[part]`` stacked as float64 on ``dev``: ``(b, d_out, d_in)``; None for None."""
    if mats is None:
        return None
    out = torch.empty((len(part), *mats[part[0]].shape), dtype=torch.float64, device=dev)
    for j, i in enumerate(part):
        out[j].copy_(mats[i])  # converts and moves in one pass
    return out
