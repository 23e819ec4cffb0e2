"""The statistics file (``GradientStats.save`` / ``load``): one safetensors file, the per-module
statistics as JSON metadata, the kept gradients and noise estimates as tensors.

Format 2 adds the noise estimate's fields per module (``noise_mean`` … ``signal_erank``) and the
noise tensors (``noise/<name>``); format-1 files still load, without a noise estimate. The
optional key ``moment_cov`` (format 2, added by issue 33) holds each type's sampling covariance
of its modules' moments (``probe_moments``); files without it load with ``moment_cov = None``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .files import atomic_write
from .stats import FORMAT, FORMAT_VERSION, NOISE_PREFIX, READABLE_VERSIONS

if TYPE_CHECKING:
    from .stats import GradientStats


def write(stats: GradientStats, path: str | os.PathLike, keep_gradients: bool) -> Path:
    """Atomically write ``stats`` to ``path`` (gradients and noise only if ``keep_gradients``)."""
    from safetensors.torch import save_file

    tensors = {}
    if keep_gradients:
        for n, g in stats.gradients.items():
            tensors[n] = g.detach().to("cpu", torch.float32).contiguous()
        for n, d in (stats.noise or {}).items():
            tensors[NOISE_PREFIX + n] = d.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "steps": str(stats.steps),
        "meta": json.dumps(stats.meta),
        "modules": json.dumps([asdict(m) for m in stats.modules.values()]),
    }
    if stats.moment_cov is not None:  # optional key: readers before it ignore it
        meta["moment_cov"] = json.dumps(stats.moment_cov)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read(path: str | os.PathLike) -> tuple[dict[str, dict], Any, int, dict, Any, Any]:
    """``(modules as dicts, gradients or None, steps, meta, noise or None, moment covariances or
    None)`` of a file written by ``write``; ValueError naming the file when it is missing,
    truncated or foreign."""
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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{str(path)!r} has statistics format version {meta.get('format_version')}; this "
            f"entrolora reads versions {', '.join(READABLE_VERSIONS)}. Probe again with this "
            "version."
        )
    modules = {}
    for d in json.loads(meta["modules"]):
        d["shape"] = tuple(d["shape"])
        modules[d["name"]] = d
    noise = {k[len(NOISE_PREFIX) :]: t for k, t in tensors.items() if k.startswith(NOISE_PREFIX)}
    grads = {k: t for k, t in tensors.items() if not k.startswith(NOISE_PREFIX)}
    moment_cov = json.loads(meta["moment_cov"]) if "moment_cov" in meta else None
    steps, extra = int(meta["steps"]), json.loads(meta["meta"])
    return modules, grads or None, steps, extra, noise or None, moment_cov
