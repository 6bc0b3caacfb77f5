"""Plots of runs, drawn with matplotlib's object API (no pyplot state, no GUI backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedtl.run_folder import LORA_MERGE_ERROR, LORA_MERGE_ERROR_LAYERS


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


def plot_privacy(curves: Mapping[str, Sequence[tuple[int, float]]], accuracy: Sequence[tuple[float, float]],
                 path: Path, *, title: str = "") -> Path:
    """Privacy spent: epsilon per round (one line per client), and accuracy against epsilon along the run.

    Parameters
    ----------
    curves : Mapping[str, Sequence[tuple[int, float]]]
        Client (or ``"all"`` for client-level DP) -> (round, cumulative epsilon) points.
    accuracy : Sequence[tuple[float, float]]
        (max epsilon over clients, test accuracy) after each round.
    path : Path
        Where the PNG goes.
    title : str, default ""
        Figure title.
    """
    fig = Figure(figsize=(10, 4), dpi=120)
    left, right = fig.subplots(1, 2)
    for label, points in curves.items():
        left.plot([r for r, _ in points], [e for _, e in points], marker="o", markersize=2, linewidth=1,
                  label=f"client {label}" if label != "all" else "all clients")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("round")
    left.set_ylabel("cumulative epsilon")
    if 0 < len(curves) <= 10:
        left.legend(fontsize="small")
    right.plot([e for e, _ in accuracy], [a for _, a in accuracy], marker="o", markersize=3)
    right.set_xlabel("epsilon spent (max over clients)")
    right.set_ylabel("test accuracy (all styles)")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_merge_error(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """A LoRA run's merge error per round, one line per adapted layer (``lora_merge_error_layers``) and
    their mean; ``None`` when no round measured it.

    Parameters
    ----------
    rows : Sequence[Mapping]
        The run's metrics rows.
    path : Path
        Where the PNG goes.
    title : str, default ""
        Figure title.
    """
    measured = [r for r in rows if r.get(LORA_MERGE_ERROR_LAYERS)]
    if not measured:
        return None
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    rounds = [r["round"] for r in measured]
    for layer in measured[-1][LORA_MERGE_ERROR_LAYERS]:
        ax.plot(rounds, [max(r[LORA_MERGE_ERROR_LAYERS].get(layer, float("nan")), 1e-12) for r in measured],
                linewidth=0.8, alpha=0.6)
    ax.plot(rounds, [max(r[LORA_MERGE_ERROR], 1e-12) for r in measured], color="black", marker="o",
            markersize=3, label="mean over layers")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="‖mean(B·A) − merged‖ / ‖mean(B·A)‖")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "LoRA merge error per adapted layer (exact merges at the floor, 1e-12)")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
