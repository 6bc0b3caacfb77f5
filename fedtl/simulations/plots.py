"""Plots of runs, drawn with matplotlib's object API (no pyplot state, no GUI backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_accuracy(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *, title: str = "") -> Path:
    """Test accuracy per round, one line per run (e.g. pre-trained vs scratch).

    Parameters
    ----------
    runs : Mapping[str, Sequence[Mapping]]
        Label -> metrics rows (each with ``round`` and ``accuracy``).
    path : Path
        Where the PNG goes.
    title : str, default ""
        Figure title.
    """
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for label, rows in runs.items():
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (all styles)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
