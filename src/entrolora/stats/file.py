"""The statistics file (``GradientStats.save`` / ``load``): one safetensors file, the per-module
statistics as JSON metadata, the kept gradients and noise estimates as tensors.

Format 2 adds the noise estimate's fields per module (``noise_mean`` … ``signal_erank``) and the
noise tensors (``noise/<name>``); format 3 the top singular values (``spectrum``,
``signal_spectrum``). Older files still load, without what they lack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write
from ..guards.output import STATS_FORMAT
from .module import ModuleStats

FORMAT = STATS_FORMAT
FORMAT_VERSION = 3  # 2: noise estimate, signal statistics; 3: spectra. Older files still load
READABLE_VERSIONS = ("1", "2", "3")
NOISE_PREFIX = "noise/"  # saved noise estimates: module names never hold a slash


def write(
    path: str | os.PathLike,
    keep_gradients: bool,
    modules: Iterable[ModuleStats],
    steps: int,
    meta: dict,
    gradients: Mapping[str, torch.Tensor] | None,
    noise: Mapping[str, torch.Tensor] | None,
    moment_cov: Any = None,
) -> Path:
    """Atomically write the statistics of ``modules`` (and, with ``keep_gradients``, the
    gradients and noise estimates; ``moment_cov`` when there is one) to ``path``; returns the
    path."""
    from safetensors.torch import save_file

    tensors = {}
    if keep_gradients:
        for n, g in (gradients or {}).items():
            tensors[n] = g.detach().to("cpu", torch.float32).contiguous()
        for n, d in (noise or {}).items():
            tensors[NOISE_PREFIX + n] = d.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "steps": str(steps),
        "meta": json.dumps(meta),
        "modules": json.dumps([asdict(m) for m in modules]),
    }
    if moment_cov is not None:  # optional key: readers before it ignore it
        meta["moment_cov"] = json.dumps(moment_cov)
    from ..guards.output import guard_file, tensor_bytes

    path = guard_file(path, "GradientStats.save", tensor_bytes(tensors) + len(meta["modules"]))
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
    from ..guards.values import check_stats_module

    fix = "probe again (`entrolora probe`)"
    where = f"statistics file {str(path)!r}"
    try:
        entries, steps, extra = json.loads(meta["modules"]), int(meta["steps"]), meta.get("meta")
        extra = json.loads(extra) if extra else {}
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where} has a damaged header ({e}); {fix}") from None
    if not isinstance(entries, list) or not entries or steps < 1:
        raise ValueError(f"{where} holds no module statistics or no probe steps; {fix}")
    modules = {}
    for d in entries:
        if not isinstance(d, dict):
            raise ValueError(f"{where} has a module entry that is not an object; {fix}")
        check_stats_module(d, f"{where}, module {d.get('name')!r}", fix)
        d["shape"] = tuple(d["shape"])
        for key in ("spectrum", "signal_spectrum"):  # JSON lists: tuples, as computed
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        modules[d["name"]] = d
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {k!r} holds NaN or infinite values; {fix}")
    noise = {k[len(NOISE_PREFIX) :]: t for k, t in tensors.items() if k.startswith(NOISE_PREFIX)}
    grads = {k: t for k, t in tensors.items() if not k.startswith(NOISE_PREFIX)}
    moment_cov = json.loads(meta["moment_cov"]) if "moment_cov" in meta else None
    return modules, grads or None, steps, extra, noise or None, moment_cov
