"""PNG plots of a run's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def rounds_axis(ax) -> None:
    """An x axis of round numbers (integer ticks) and a light grid."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write the PNG and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_metric(records: list[dict[str, Any]], path: Path, metric: str = "accuracy",
                title: str = "", target: float | None = None) -> Path:
    """Task metric (left) and train / eval loss (right) over rounds."""
    evaluated = [r for r in records if r.get(metric) is not None]
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    ax_m.plot([r["round"] for r in evaluated], [r[metric] for r in evaluated], marker="o")
    if target is not None:
        ax_m.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
        ax_m.legend(loc="lower right")
    ax_m.set(xlabel="round", ylabel=f"validation {metric}", title=title or metric)
    trained = [r for r in records if r["train_loss"] is not None]
    ax_l.plot([r["round"] for r in trained], [r["train_loss"] for r in trained],
              label="train (selected clients)")
    ax_l.plot([r["round"] for r in evaluated], [r["eval_loss"] for r in evaluated],
              label="validation (global model)")
    ax_l.set(xlabel="round", ylabel="loss", title="loss")
    ax_l.legend()
    for ax in (ax_m, ax_l):
        rounds_axis(ax)
    return save_figure(fig, path)
