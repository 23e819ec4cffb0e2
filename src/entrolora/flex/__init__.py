"""FlexLoRA during training (METHODS.md §5): the controller that prunes and expands ranks, its
schedule, the optimizer-state resets and the rank-evolution figures. The adapter module itself
and the tensor maths it shares with the controller live in ``adapters/``.

Modules: ``controller`` (``FlexLoRA``), ``schedule``, ``optim``, ``plot``.
"""

from .controller import FlexLoRA, flex_adapters
from .plot import plot_rank_evolution, rank_matrix
from .schedule import FlexSchedule

__all__ = ["FlexLoRA", "FlexSchedule", "flex_adapters", "plot_rank_evolution", "rank_matrix"]
