"""GradientStats: per-module statistics of accumulated gradients and their similarity matrices.

Everything here is a function of the accumulated gradients ``G`` (METHODS.md §1), of the probe's
noise estimate ``D`` when there is one (§2, "Probe noise") and, for sensitivity, of the weights
``W``. Statistics are computed in float64 whatever the model dtype. Each module carries the raw
statistics of ``G`` (the papers' reading) and, with ``D``, the statistics of the signal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..targets import split_module_name
from .file import read, write
from .module import SPECTRUM_KEEP, ModuleStats
from .moments import (
    HALF_LOG_2PI_PLUS_HALF,
    REFERENCE_SIGMA,
    gradient_similarity,
    kl_similarity,
    moments,
    proxy_entropy,
    rmi_matrix,
    signal_fields,
)
from .spectral import spectra_and_eranks

SIMILARITY_KINDS = ("rmi", "cosine", "l1", "l2", "kl")
RMI_SCALES = ("reference", "raw")
STATISTICS = ("signal", "raw")
__all__ = ["HALF_LOG_2PI_PLUS_HALF", "REFERENCE_SIGMA", "GradientStats", "ModuleStats"]
__all__ += ["proxy_entropy"]
Tensors = Mapping[str, torch.Tensor]


def _check_inputs(
    grads: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    noise: Mapping[str, torch.Tensor] | None,
) -> None:
    """ValueError naming the first bad input of ``from_gradients`` (see its docstring)."""
    if not grads:
        raise ValueError("no gradients given: pass {module name: gradient tensor}")
    unknown = set(weights) - set(grads)
    if unknown:
        raise ValueError(f"weights given for modules without gradients: {sorted(unknown)[:5]}")
    if noise is not None and set(noise) != set(grads):
        odd = sorted(set(noise) ^ set(grads))
        raise ValueError(
            f"noise must hold one estimate per gradient; mismatched modules: {odd[:5]}"
        )
    for name, g in grads.items():
        if g.dim() != 2:
            raise ValueError(
                f"gradient of {name!r} has shape {tuple(g.shape)}; expected a 2-D "
                "(d_out, d_in) matrix"
            )
        _check_finite(name, g)
        for what, other in (("weight", weights), ("noise estimate", noise or {})):
            if name in other and tuple(other[name].shape) != tuple(g.shape):
                raise ValueError(
                    f"{what} of {name!r} has shape {tuple(other[name].shape)} but its gradient "
                    f"{tuple(g.shape)}; pass it in (d_out, d_in) orientation"
                )
        if noise is not None:
            _check_finite(name, noise[name], "noise estimate")


def _module_stats(
    name: str,
    located: tuple[str, int],
    g: torch.Tensor,
    moments_g: tuple[float, float],
    erank: float | None,
    sensitivity: float | None,
    signal: dict,
    spectra: tuple[list[float] | None, list[float] | None],
) -> ModuleStats:
    mean, std = moments_g
    return ModuleStats(
        name=name,
        module_type=located[0],
        layer=located[1],
        shape=(int(g.shape[0]), int(g.shape[1])),
        numel=int(g.numel()),
        mean=mean,
        std=std,
        entropy=proxy_entropy(std) if std > 0 else None,
        erank=erank,
        sensitivity=sensitivity,
        **signal,
        spectrum=None if spectra[0] is None else tuple(spectra[0]),
        signal_spectrum=None if spectra[1] is None else tuple(spectra[1]),
    )


def _elementwise(
    grads: Tensors, weights: Tensors, noise: Tensors | None, order: list[str], device: Any
) -> tuple[dict, dict, dict]:
    """``(moments of G, moments of D, sensitivity or None)`` per module, in float64 on ``device``
    (default: each gradient's own); one float64 copy of each G serves moments and sensitivity."""
    found, noise_moments, sens = {}, {}, {}
    for n in order:
        g64 = grads[n].detach().to(device=device or grads[n].device, dtype=torch.float64)
        found[n] = moments(g64)
        sens[n] = None
        if n in weights:  # RaLoRA eq. 5: mean |W ⊙ G|
            w = weights[n].detach().to(device=g64.device, dtype=torch.float64)
            sens[n] = float((w * g64).abs().mean())
        if noise:
            noise_moments[n] = moments(noise[n].detach().to(g64.device))
    return found, noise_moments, sens


def _check_finite(name: str, g: torch.Tensor, what: str = "gradient") -> None:
    if not bool(torch.isfinite(g).all()):
        raise ValueError(
            f"{what} of {name!r} contains NaN or Inf; check the data and the loss "
            "(a lower learning-rate-free probe still needs a finite loss)."
        )


@dataclass
class GradientStats:
    """Per-module gradient statistics, grouped by module type (METHODS.md §1–2).

    ``modules`` maps each qualified module name to its ``ModuleStats``; ``gradients`` holds the
    accumulated float32 gradients (``d_out × d_in``) when they were kept (``noise`` their noise
    estimates ``D``, kept with them when there are some), which the ``cosine``,
    ``l1`` and ``l2`` similarities need.
    """

    modules: dict[str, ModuleStats]
    gradients: dict[str, torch.Tensor] | None = None
    steps: int = 1
    meta: dict = field(default_factory=dict)
    noise: dict[str, torch.Tensor] | None = None
    # {module type: 2N × 2N sampling covariance of (mean, mean of squares) of its modules by
    # layer}, from the probe's batches (probing/moments.py); None when not measured
    moment_cov: dict[str, list[list[float]]] | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_gradients(
        cls,
        grads: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
        *,
        noise: Mapping[str, torch.Tensor] | None = None,
        steps: int = 1,
        keep_gradients: bool = True,
        meta: dict | None = None,
        device: torch.device | str | None = None,
    ) -> GradientStats:
        """Statistics of ``{module name: G}`` (``d_out × d_in``), optionally with ``{name: W}``.

        METHODS.md §2: mean, population std, proxy entropy (E²LoRA eq. 1), effective rank
        (RaLoRA eq. 3) and, given W, sensitivity ``mean|W ⊙ G|`` (RaLoRA eq. 5), all in float64.
        ``noise``: ``{name: D}``, the noise estimate of every ``G`` (§2 "Probe noise", e.g.
        ``(G₁ − G₂)/2`` of two equal halves; ``from_halves`` builds it); then each module also
        gets ``snr`` and the signal statistics. ``device``: where the statistics are computed
        (default: each gradient's own device). Names must carry a layer index
        (``...layers.3.q_proj``). Raises ValueError on an empty mapping, a non-2-D or non-finite
        gradient or noise, or a weight or noise whose shape differs from ``G``.
        """
        _check_inputs(grads, weights or {}, noise)
        weights = weights or {}
        located = {name: split_module_name(name) for name in grads}
        order = sorted(grads, key=lambda n: located[n])

        found, noise_moments, sens = _elementwise(grads, weights, noise, order, device)
        live = [n for n in order if found[n][1] > 0]
        # one float64 stack and one eigvalsh per shape group: eranks and spectra together
        live_noise = [noise[n] for n in live] if noise else None
        found_sp = spectra_and_eranks(
            [grads[n] for n in live], live_noise, SPECTRUM_KEEP, device=device
        )
        eranks = dict(zip(live, found_sp.raw_erank))
        signal_eranks = dict(zip(live, found_sp.signal_erank or []))
        spectra = dict(zip(live, zip(found_sp.raw_sv, found_sp.signal_sv)))
        modules = {}
        for n in order:
            g = grads[n]
            signal = signal_fields(g.numel(), found[n], noise_moments.get(n), signal_eranks.get(n))
            modules[n] = _module_stats(
                n, located[n], g, found[n], eranks.get(n), sens[n], signal,
                spectra.get(n, (None, None)),
            )  # fmt: skip
        kept = kept_noise = None
        if keep_gradients:
            kept = {n: grads[n].detach().to(device="cpu", dtype=torch.float32) for n in order}
            if noise:
                kept_noise = {n: noise[n].detach().to("cpu", torch.float32) for n in order}
        return cls(modules, kept, steps, dict(meta or {}), kept_noise)

    @classmethod
    def from_halves(
        cls,
        first: Mapping[str, torch.Tensor],
        second: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
        *,
        counts: tuple[int, int] = (1, 1),
        **kwargs: Any,
    ) -> GradientStats:
        """Statistics from the mean gradients of two disjoint halves of the batches (§2).

        ``first``/``second``: ``{name: G₁}``, ``{name: G₂}``, the means over ``counts = (n₁, n₂)``
        batches. ``G = (n₁G₁ + n₂G₂)/S`` and ``D = √(n₁n₂)/S · (G₁ − G₂)`` (``(G₁ − G₂)/2`` for
        equal halves), whose covariance is that of G's sampling noise for any ``n₁, n₂ ≥ 1``.
        ``steps`` defaults to ``S``; other keywords as ``from_gradients``.
        """
        n1, n2 = counts
        if set(first) != set(second):
            raise ValueError("first and second half must hold the same module names")
        if n1 < 1 or n2 < 1:
            raise ValueError(f"each half needs at least one batch, got counts={counts!r}")
        total = n1 + n2
        grads, noise = {}, {}
        for name, g1 in first.items():
            g2 = second[name]
            grads[name] = (n1 * g1 + n2 * g2) / total
            noise[name] = (g1 - g2) * (math.sqrt(n1 * n2) / total)
        kwargs.setdefault("steps", total)
        return cls.from_gradients(grads, weights, noise=noise, **kwargs)

    # -- access -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> ModuleStats:
        try:
            return self.modules[name]
        except KeyError:
            raise KeyError(f"no statistics for module {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    @property
    def types(self) -> dict[str, list[str]]:
        """``{module type: [module names ordered by layer]}``."""
        out: dict[str, list[str]] = {}
        for s in sorted(self.modules.values(), key=lambda s: (s.module_type, s.layer)):
            out.setdefault(s.module_type, []).append(s.name)
        return out

    @property
    def degenerate(self) -> list[str]:
        """Names of modules whose accumulated gradient is exactly zero."""
        return [n for n, s in self.modules.items() if s.degenerate]

    @property
    def has_noise(self) -> bool:
        """Whether every module has a noise estimate (a probe of ≥ 2 batches, format ≥ 2)."""
        return bool(self.modules) and all(m.has_noise for m in self.modules.values())

    def check_statistics(self, statistics: str) -> str:
        """``statistics`` if valid and available; ValueError naming the fix otherwise."""
        if statistics not in STATISTICS:
            raise ValueError(
                f"statistics must be one of {', '.join(map(repr, STATISTICS))}; got {statistics!r}"
            )
        if statistics == "signal" and not self.has_noise:
            raise ValueError(
                "these statistics hold no noise estimate (probed with one batch, or saved by an "
                "entrolora before statistics format 2); use statistics='raw' or probe again"
            )
        return statistics

    # -- probe noise --------------------------------------------------------------------------
    def snr_by_type(self) -> dict[str, float]:
        """``{module type: median snr of its modules}``; empty without a noise estimate (§2)."""
        if not self.has_noise:
            return {}
        out = {}
        for t, names in self.types.items():
            vals = sorted(self.modules[n].snr for n in names)
            out[t] = _median(vals)
        return out

    def low_snr_warning(self) -> str | None:
        """One line when most modules have ``snr < 1``, with the probe steps that would lift
        them (snr grows in proportion to the steps: ``steps / median snr``); None otherwise."""
        if not self.has_noise:
            return None
        snrs = sorted(m.snr for m in self.modules.values())
        low = sum(v < 1 for v in snrs)
        if 2 * low <= len(snrs):
            return None
        med = _median(snrs)
        lift = (
            f"about {math.ceil(self.steps / med)} probe steps would lift most above 1"
            if med > 0
            else "no signal is measurable in most of them; probe far more steps"
        )
        return (
            f"warning: {low} of {len(snrs)} modules have gradient SNR < 1 at {self.steps} probe "
            f"steps (median {med:.2f}): their plan reads mostly noise; {lift} (--probe-steps)"
        )

    # -- similarity ---------------------------------------------------------------------------
    def similarity(
        self,
        module_type: str,
        kind: str = "rmi",
        rmi_scale: str = "reference",
        statistics: str = "raw",
    ) -> torch.Tensor:
        """Symmetric ``N × N`` float64 similarity of the type's modules, unit diagonal (§2).

        ``kind``: ``rmi`` (eq. 3; ``rmi_scale="reference"`` rescales the type's gradients to a
        geometric-mean σ of 1e-3 first, ``"raw"`` is the literal formula), ``cosine``, ``l1``,
        ``l2`` (need kept gradients) or ``kl``. ``statistics="signal"`` reads the signal
        moments for ``rmi`` and ``kl`` (needs a noise estimate); ``cosine``, ``l1``, ``l2``
        compare the kept gradients as they are. Degenerate modules get 0 off the diagonal.
        """
        if module_type not in self.types:
            raise ValueError(
                f"unknown module type {module_type!r}; known types: {', '.join(self.types)}"
            )
        if kind not in SIMILARITY_KINDS:
            raise ValueError(
                f"unknown similarity kind {kind!r}; choose one of {', '.join(SIMILARITY_KINDS)}"
            )
        if rmi_scale not in RMI_SCALES:
            raise ValueError(
                f"unknown rmi_scale {rmi_scale!r}; choose one of {', '.join(RMI_SCALES)}"
            )
        self.check_statistics(statistics)
        names = self.types[module_type]
        mods = [self.modules[n] for n in names]
        live = [not m.degenerate for m in mods]
        if kind == "rmi":
            sim = rmi_matrix(mods, live, rmi_scale, statistics)
        elif kind == "kl":
            sim = kl_similarity(mods, statistics)
        else:
            sim = self._gradient_similarity(names, kind)
        live_t = torch.tensor(live)
        sim = torch.where(live_t[:, None] & live_t[None, :], sim, torch.zeros_like(sim))
        return sim.fill_diagonal_(1.0)

    def _gradient_similarity(self, names: list[str], kind: str) -> torch.Tensor:
        if self.gradients is None:
            raise ValueError(
                f"similarity kind {kind!r} needs the accumulated gradients, which these "
                "statistics do not hold; probe again, or save with keep_gradients=True"
            )
        shapes = {tuple(self.gradients[n].shape) for n in names}
        if len(shapes) != 1:
            raise ValueError(
                f"similarity {kind!r} needs same-shape gradients; got {sorted(shapes)}"
            )
        return gradient_similarity([self.gradients[n] for n in names], kind)

    # -- persistence (file.py) --------------------------------------------------------------
    def save(self, path: str | os.PathLike, keep_gradients: bool = False) -> Path:
        """Write one safetensors file: statistics as JSON metadata, gradients if asked (with
        their noise estimates, as ``noise/<name>``, when these statistics hold them).

        Returns the path. The write is atomic (temporary file, then rename).
        """
        if keep_gradients and self.gradients is None:
            raise ValueError("keep_gradients=True but these statistics hold no gradients")
        return write(
            path,
            keep_gradients,
            self.modules.values(),
            self.steps,
            self.meta,
            self.gradients,
            self.noise,
            self.moment_cov,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientStats:
        """Read a file written by ``save`` (format 1 or 2); ValueError on a missing, truncated or
        foreign file."""
        modules, grads, steps, meta, noise, moment_cov = read(path)
        mods = {name: ModuleStats(**d) for name, d in modules.items()}
        return cls(mods, grads, steps, meta, noise, moment_cov)


def _median(sorted_values: list[float]) -> float:
    k = len(sorted_values)
    mid = k // 2
    return sorted_values[mid] if k % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])
