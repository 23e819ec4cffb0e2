"""``entrolora.train``: the names of the training job, which lives in ``entrolora.job``.

Kept so that ``from entrolora.train import TrainConfig, train_run`` (and the other names
below) keeps working; new code imports from ``entrolora.job``.
"""

from __future__ import annotations

from .job import *  # noqa: F403
from .job import __all__ as _job_all
from .job.loop import _lr_lambda  # noqa: F401  (tests check the schedule through this name)

__all__ = list(_job_all)
