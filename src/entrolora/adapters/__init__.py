"""Adapter modules: the protocol and wrapper (``base``), low-rank (``lowrank``), variants."""

from .base import AdaptedLinear, Adapter, base_weight, kaiming_uniform
from .lowrank import BlockDiagonalAdapter, LowRankAdapter
from .variants import DoRAAdapter, LoRIAdapter, VeRAAdapter

__all__ = [
    "AdaptedLinear",
    "Adapter",
    "BlockDiagonalAdapter",
    "DoRAAdapter",
    "LoRIAdapter",
    "LowRankAdapter",
    "VeRAAdapter",
    "base_weight",
    "kaiming_uniform",
]
