"""``AdaptationPlan``: what the planners return and ``apply`` reads — per module rank, shared
group, blocks and kind; JSON; validation against a model; parameter counts (``plan``) — and its
plain-text summary (``summary``).
"""

from .plan import (
    FLEX_INITS,
    FORMAT,
    FORMAT_VERSION,
    FROZEN_FACTORS,
    KINDS,
    SHAREABLE_FACTORS,
    AdaptationPlan,
    GroupPlan,
    ModulePlan,
    lori_kept,
    need_plan,
)
from .summary import undecided_lines

__all__ = [
    "FLEX_INITS", "FORMAT", "FORMAT_VERSION", "FROZEN_FACTORS", "KINDS",
    "SHAREABLE_FACTORS", "AdaptationPlan", "GroupPlan", "ModulePlan", "lori_kept", "need_plan",
    "undecided_lines",
]  # fmt: skip
