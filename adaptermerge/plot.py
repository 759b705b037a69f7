"""A PNG bar chart of an evaluation: one panel per metric, tasks on the x axis, one bar per model."""

from __future__ import annotations

import os
from pathlib import Path

from adaptermerge.errors import UsageError
from adaptermerge.evaluation import LOWER_IS_BETTER, EvalReport


def plot_report(report: EvalReport, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``report`` as a grouped bar chart (PNG, matplotlib's Agg backend, no display needed).

    The file is written to a temporary sibling and renamed into place, like every other output.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("`plot` needs matplotlib: pip install matplotlib") from None
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"`plot` {out} is a folder; give a .png file name")
    n_models, n_tasks = len(report.models), len(report.tasks)
    fig, axes = plt.subplots(
        len(report.metrics), 1, figsize=(max(6.0, 3.2 + n_tasks * (0.35 * n_models + 0.6)), 3.6 * len(report.metrics))
    )
    axes = axes if len(report.metrics) > 1 else [axes]
    width = 0.8 / max(n_models, 1)
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes, report.metrics, strict=True):
        for i, model in enumerate(report.models):
            xs = [t + (i - (n_models - 1) / 2) * width for t in range(n_tasks)]
            ys = [report.scores[metric][model][task] for task in report.tasks]
            ax.bar(xs, ys, width, label=f"{model} ({report.kinds[model]})", color=cmap(i % 20))
        ax.set_xticks(range(n_tasks), report.tasks)
        ax.set_ylabel(f"{metric} ({'lower' if LOWER_IS_BETTER[metric] else 'higher'} is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(title or "adaptermerge evaluate: per-task scores")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
