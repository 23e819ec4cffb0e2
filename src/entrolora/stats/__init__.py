"""Statistics of probed gradients (METHODS.md §2): ``GradientStats`` and ``ModuleStats``, moments
and similarities, effective rank (exact and estimated), the statistics file.

Modules: ``module`` (the per-module record), ``moments`` (entropies, RMI and the other
similarities), ``singular`` (exact singular values), ``slq`` (the fast effective-rank estimate),
``spectral`` (effective ranks, batched), ``file`` (save / load), ``gradient_stats`` (the
collection the planners read).
"""

from .file import FORMAT, FORMAT_VERSION, NOISE_PREFIX, READABLE_VERSIONS
from .gradient_stats import RMI_SCALES, SIMILARITY_KINDS, STATISTICS, GradientStats
from .module import ModuleStats
from .moments import HALF_LOG_2PI_PLUS_HALF, REFERENCE_SIGMA, proxy_entropy

__all__ = [
    "FORMAT", "FORMAT_VERSION", "HALF_LOG_2PI_PLUS_HALF", "NOISE_PREFIX", "READABLE_VERSIONS",
    "REFERENCE_SIGMA", "RMI_SCALES", "SIMILARITY_KINDS", "STATISTICS", "GradientStats",
    "ModuleStats", "proxy_entropy",
]  # fmt: skip
