"""GradientStats: per-module statistics of accumulated gradients and their similarity matrices.

Everything here is a function of the accumulated gradients ``G`` (METHODS.md §1) and, for
sensitivity, of the weights ``W``. Statistics are computed in float64 whatever the model dtype.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .files import atomic_write
from .spectral import effective_ranks
from .targets import split_module_name

FORMAT = "entrolora.stats"
FORMAT_VERSION = 1
HALF_LOG_2PI_PLUS_HALF = 0.5 * math.log(2 * math.pi) + 0.5
REFERENCE_SIGMA = 1e-3
SIMILARITY_KINDS = ("rmi", "cosine", "l1", "l2", "kl")
RMI_SCALES = ("reference", "raw")


def proxy_entropy(sigma: float) -> float:
    """Proxy entropy ``log σ + ½ log 2π + ½`` (E²LoRA eq. 1); σ must be > 0."""
    return math.log(sigma) + HALF_LOG_2PI_PLUS_HALF


@dataclass(frozen=True)
class ModuleStats:
    """Statistics of one target module's accumulated gradient ``G`` (``d_out × d_in``).

    ``entropy`` and ``erank`` are None for a *degenerate* module (``std == 0``: no gradient
    reached it), METHODS.md §2. ``sensitivity`` (RaLoRA eq. 5) is None when no weight was given.
    """

    name: str
    module_type: str
    layer: int
    shape: tuple[int, int]
    numel: int
    mean: float
    std: float
    entropy: float | None
    erank: float | None
    sensitivity: float | None

    @property
    def degenerate(self) -> bool:
        return self.std == 0.0

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]


def _moments(g: torch.Tensor) -> tuple[float, float]:
    g64 = g.detach().to(torch.float64)
    mean = g64.mean()
    std = (g64 - mean).square().mean().sqrt()  # population std (ddof = 0)
    return float(mean), float(std)


def _check_finite(name: str, g: torch.Tensor) -> None:
    if not bool(torch.isfinite(g).all()):
        raise ValueError(
            f"gradient of {name!r} contains NaN or Inf; check the data and the loss "
            "(a lower learning-rate-free probe still needs a finite loss)."
        )


@dataclass
class GradientStats:
    """Per-module gradient statistics, grouped by module type (METHODS.md §1–2).

    ``modules`` maps each qualified module name to its ``ModuleStats``; ``gradients`` holds the
    accumulated float32 gradients (``d_out × d_in``) when they were kept, which the ``cosine``,
    ``l1`` and ``l2`` similarities need.
    """

    modules: dict[str, ModuleStats]
    gradients: dict[str, torch.Tensor] | None = None
    steps: int = 1
    meta: dict = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_gradients(
        cls,
        grads: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
        *,
        steps: int = 1,
        keep_gradients: bool = True,
        meta: dict | None = None,
        device: torch.device | str | None = None,
    ) -> GradientStats:
        """Statistics of ``{module name: G}`` (``d_out × d_in``), optionally with ``{name: W}``.

        METHODS.md §2: mean, population std, proxy entropy (E²LoRA eq. 1), effective rank
        (RaLoRA eq. 3) and, given W, sensitivity ``mean|W ⊙ G|`` (RaLoRA eq. 5), all in float64.
        ``device``: where the statistics are computed (default: each gradient's own device), so
        that host-held gradients can still use the accelerator. Names must carry a layer index
        (``...layers.3.q_proj``). Raises ValueError on an empty mapping, a non-2-D or non-finite
        gradient, or a weight whose shape differs from ``G``.
        """
        if not grads:
            raise ValueError("no gradients given: pass {module name: gradient tensor}")
        weights = weights or {}
        unknown = set(weights) - set(grads)
        if unknown:
            raise ValueError(f"weights given for modules without gradients: {sorted(unknown)[:5]}")
        for name, g in grads.items():
            if g.dim() != 2:
                raise ValueError(
                    f"gradient of {name!r} has shape {tuple(g.shape)}; expected a 2-D "
                    "(d_out, d_in) matrix"
                )
            _check_finite(name, g)
            if name in weights and tuple(weights[name].shape) != tuple(g.shape):
                raise ValueError(
                    f"weight of {name!r} has shape {tuple(weights[name].shape)} but its gradient "
                    f"{tuple(g.shape)}; pass weights in (d_out, d_in) orientation"
                )
        located = {name: split_module_name(name) for name in grads}
        order = sorted(grads, key=lambda n: located[n])

        def on(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if device is None else t.detach().to(device)

        moments = {n: _moments(on(grads[n])) for n in order}
        live = [n for n in order if moments[n][1] > 0]
        eranks = dict(zip(live, effective_ranks([grads[n] for n in live], device=device)))
        modules = {}
        for n in order:
            g = grads[n]
            mean, std = moments[n]
            sens = None
            if n in weights:
                g64 = on(g).to(torch.float64)
                w = weights[n].detach().to(device=g64.device, dtype=torch.float64)
                sens = float((w * g64).abs().mean())
            modules[n] = ModuleStats(
                name=n,
                module_type=located[n][0],
                layer=located[n][1],
                shape=(int(g.shape[0]), int(g.shape[1])),
                numel=int(g.numel()),
                mean=mean,
                std=std,
                entropy=proxy_entropy(std) if std > 0 else None,
                erank=eranks.get(n),
                sensitivity=sens,
            )
        kept = None
        if keep_gradients:
            kept = {n: grads[n].detach().to(device="cpu", dtype=torch.float32) for n in order}
        return cls(modules=modules, gradients=kept, steps=steps, meta=dict(meta or {}))

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

    # -- similarity ---------------------------------------------------------------------------
    def similarity(
        self, module_type: str, kind: str = "rmi", rmi_scale: str = "reference"
    ) -> torch.Tensor:
        """Symmetric ``N × N`` float64 similarity of the type's modules, unit diagonal (§2).

        ``kind``: ``rmi`` (eq. 3; ``rmi_scale="reference"`` rescales the type's gradients to a
        geometric-mean σ of 1e-3 first, ``"raw"`` is the literal formula), ``cosine``, ``l1``,
        ``l2`` (need kept gradients) or ``kl``. Degenerate modules get 0 off the diagonal.
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
        names = self.types[module_type]
        mods = [self.modules[n] for n in names]
        live = [not m.degenerate for m in mods]
        if kind == "rmi":
            sim = _rmi(mods, live, rmi_scale)
        elif kind == "kl":
            sim = _kl_similarity(mods, live)
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
        g = torch.stack([self.gradients[n].reshape(-1) for n in names]).to(torch.float64)
        if kind == "cosine":
            unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
            return unit @ unit.T
        if kind == "l1":
            return 1.0 / (
                1.0
                + torch.cdist(g, g, p=1, compute_mode="donot_use_mm_for_euclid_dist") / g.shape[1]
            )
        return 1.0 / (
            1.0
            + torch.cdist(g, g, p=2, compute_mode="donot_use_mm_for_euclid_dist")
            / math.sqrt(g.shape[1])
        )

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, keep_gradients: bool = False) -> Path:
        """Write one safetensors file: statistics as JSON metadata, gradients if asked.

        Returns the path. The write is atomic (temporary file, then rename).
        """
        from safetensors.torch import save_file

        if keep_gradients and self.gradients is None:
            raise ValueError("keep_gradients=True but these statistics hold no gradients")
        tensors = {}
        if keep_gradients:
            tensors = {
                n: g.detach().to("cpu", torch.float32).contiguous()
                for n, g in self.gradients.items()
            }
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "steps": str(self.steps),
            "meta": json.dumps(self.meta),
            "modules": json.dumps([asdict(m) for m in self.modules.values()]),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientStats:
        """Read a file written by ``save``; ValueError on a missing, truncated or foreign file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"statistics file {str(path)!r} does not exist; run `entrolora probe`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(
                f"statistics file {str(path)!r} is corrupted or truncated ({e}); probe again"
            ) from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an entrolora statistics file")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{str(path)!r} has statistics format version {meta.get('format_version')}; this "
                f"entrolora reads version {FORMAT_VERSION}. Probe again with this version."
            )
        modules = {}
        for d in json.loads(meta["modules"]):
            d["shape"] = tuple(d["shape"])
            modules[d["name"]] = ModuleStats(**d)
        return cls(
            modules=modules,
            gradients=tensors or None,
            steps=int(meta["steps"]),
            meta=json.loads(meta["meta"]),
        )


def _rmi(mods: list[ModuleStats], live: list[bool], scale: str) -> torch.Tensor:
    """RMI matrix (E²LoRA eq. 3) from counts, means and stds; joint entropy from pooled moments."""
    n = torch.tensor([float(m.numel) for m in mods], dtype=torch.float64)
    mu = torch.tensor([m.mean for m in mods], dtype=torch.float64)
    sd = torch.tensor([m.std for m in mods], dtype=torch.float64)
    if scale == "reference" and any(live):
        mask = torch.tensor(live)
        geo = torch.exp(torch.log(sd[mask]).mean())
        c = REFERENCE_SIGMA / geo
        mu, sd = mu * c, sd * c
    sd_safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    h = torch.log(sd_safe) + HALF_LOG_2PI_PLUS_HALF  # (N,)
    ni, nj = n[:, None], n[None, :]
    tot = ni + nj
    mu_ij = (ni * mu[:, None] + nj * mu[None, :]) / tot
    second = (
        ni * (sd[:, None] ** 2 + mu[:, None] ** 2) + nj * (sd[None, :] ** 2 + mu[None, :] ** 2)
    ) / tot
    var_ij = (second - mu_ij**2).clamp_min(torch.finfo(torch.float64).tiny)
    h_ij = 0.5 * torch.log(var_ij) + HALF_LOG_2PI_PLUS_HALF
    denom = torch.minimum(h[:, None], h[None, :])
    return (h[:, None] + h[None, :] - h_ij) / denom


def _kl_similarity(mods: list[ModuleStats], live: list[bool]) -> torch.Tensor:
    """``exp(−½(KL(i‖j) + KL(j‖i)))`` between fitted Gaussians ``N(μ, σ²)``."""
    mu = torch.tensor([m.mean for m in mods], dtype=torch.float64)
    sd = torch.tensor([m.std if m.std > 0 else 1.0 for m in mods], dtype=torch.float64)
    var = sd**2
    dmu2 = (mu[:, None] - mu[None, :]) ** 2
    # KL(N_i ‖ N_j) = log(σ_j/σ_i) + (σ_i² + (μ_i−μ_j)²)/(2σ_j²) − ½
    kl = torch.log(sd[None, :] / sd[:, None]) + (var[:, None] + dmu2) / (2 * var[None, :]) - 0.5
    return torch.exp(-0.5 * (kl + kl.T))
