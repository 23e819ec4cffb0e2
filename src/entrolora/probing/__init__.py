"""The gradient probe (METHODS.md §1): forward+backward passes over calibration batches that fold
each target's weight gradient into float32 half-sums (even and odd batches, for the noise
estimate of §2) and return ``GradientStats``.

Modules: ``gradients`` (``probe``: hooks, offload, several processes), ``sums`` (the
accumulators).
"""

from .gradients import OFFLOADS, probe

__all__ = ["OFFLOADS", "probe"]
