"""What a person looks at: the figures (``figures``: statistics, where an ``auto`` budget went,
accuracy against parameters, FlexLoRA's ranks; ``plan_figure``: the effective rank each module
trained with) and ``report.html`` (``html``: one run, or several side by side).
"""

from .figures import (
    plot_accuracy_vs_params,
    plot_budget,
    plot_erank,
    plot_rank_evolution,
    plot_similarity_entropy,
    short_type,
)
from .html import HISTORY_FILE, ReportInputs, RunReport, gather, load_run, write_report
from .plan_figure import plan_bars, plot_plan

__all__ = [
    "HISTORY_FILE", "ReportInputs", "RunReport", "gather", "load_run", "plan_bars",
    "plot_accuracy_vs_params", "plot_budget", "plot_erank", "plot_plan", "plot_rank_evolution",
    "plot_similarity_entropy", "short_type", "write_report",
]  # fmt: skip
