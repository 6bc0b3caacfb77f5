"""The study report's figures (matplotlib's object API). Configurations are named ``#1``, ``#2``, …
as in the report's table; each function returns ``None`` when no run has what it plots.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedtl.reports.results import RunResult, StudyResults, epsilon
from fedtl.run_folder import (
    BYTES_DOWN_TOTAL,
    BYTES_UP_TOTAL,
    FINAL_ACCURACY,
    FINAL_ACCURACY_PER_STYLE,
    HELD_OUT_AFTER_MEAN,
    HELD_OUT_BEFORE_MEAN,
    HELD_OUT_CLIENTS,
    LORA_MERGE_ERROR,
    PER_CLIENT,
)

Configs = Mapping[str, Sequence[RunResult]]


def short_names(res: StudyResults) -> dict[str, str]:
    """Configuration label -> ``#k`` (1-based, plan order)."""
    return {label: f"#{i + 1}" for i, label in enumerate(res.configs)}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _mean_curve(runs: Sequence[RunResult]) -> tuple[list[int], list[float]]:
    rounds = sorted({r["round"] for run in runs for r in run.rows})
    by_round = {k: [r["accuracy"] for run in runs for r in run.rows if r["round"] == k] for k in rounds}
    return rounds, [statistics.mean(by_round[k]) for k in rounds]


def plot_curves(res: StudyResults, path: Path) -> Path:
    """Test accuracy per round, mean over seeds; from-scratch baselines dashed."""
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    for label, runs in res.configs.items():
        (line,) = ax.plot(*_mean_curve(runs), marker="o", markersize=2, label=names[label])
        scratch = [r.scratch for r in runs if r.scratch is not None]
        if scratch:
            ax.plot(*_mean_curve(scratch), linestyle="--", color=line.get_color(), linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="accuracy per round (dashed: from scratch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def _final(runs: Sequence[RunResult]) -> float:
    return statistics.mean(r.summary[FINAL_ACCURACY] for r in runs)


def plot_epsilon(res: StudyResults, path: Path) -> Path | None:
    """Final accuracy against epsilon (configurations without DP as dashed lines)."""
    points = {label: (statistics.mean(epsilon(r) for r in runs), _final(runs)) for label, runs in res.configs.items()}
    private = {k: v for k, v in points.items() if math.isfinite(v[0])}
    if not private:
        return None
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    for label, (eps, acc) in private.items():
        ax.scatter([eps], [acc])
        ax.annotate(names[label], (eps, acc), textcoords="offset points", xytext=(4, 4), fontsize="small")
    for label, (eps, acc) in points.items():
        if not math.isfinite(eps):
            ax.axhline(acc, linestyle="--", linewidth=1, color="grey")
            ax.annotate(f"{names[label]} (no DP)", (min(e for e, _ in private.values()), acc), fontsize="small")
    ax.set(xlabel="epsilon (largest over clients)", ylabel="final test accuracy", ylim=(0, 1),
           title="accuracy vs privacy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_merge_error(res: StudyResults, path: Path) -> Path | None:
    """LoRA's merge error per round (``lora_merge_error``, mean over seeds), for the configurations that
    measure it; ``None`` when none does."""
    curves = {}
    for label, runs in res.configs.items():
        by_round: dict[int, list[float]] = {}
        for run in runs:
            for r in run.rows:
                if r.get(LORA_MERGE_ERROR) is not None:
                    by_round.setdefault(r["round"], []).append(r[LORA_MERGE_ERROR])
        if by_round:
            curves[label] = (sorted(by_round), [statistics.mean(by_round[k]) for k in sorted(by_round)])
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    for label, (rounds, values) in curves.items():
        # Stacking and FFA-LoRA are exact (float rounding, ~1e-16): floored so the log scale shows them.
        ax.plot(rounds, [max(v, 1e-12) for v in values], marker="o", markersize=2, label=names[label])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="‖mean(B·A) − merged‖ / ‖mean(B·A)‖",
           title="LoRA merge error per round (mean over layers and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def plot_bytes(res: StudyResults, path: Path) -> Path:
    """Final accuracy against the bytes the run moved in total."""
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    for label, runs in res.configs.items():
        total = statistics.mean(r.summary[BYTES_DOWN_TOTAL] + r.summary[BYTES_UP_TOTAL] for r in runs)
        ax.scatter([total], [_final(runs)])
        ax.annotate(names[label], (total, _final(runs)), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xscale("log")
    ax.set(xlabel="bytes sent + received in total", ylabel="final test accuracy", ylim=(0, 1),
           title="accuracy vs communication")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_client_spread(res: StudyResults, path: Path) -> Path | None:
    """Each client's accuracy on its own held-out images, pooled over seeds: the global model's
    and, where any configuration personalises, each client's own model's next to it."""
    def pooled(key: str) -> dict[str, list[float]]:
        return {label: [a for r in runs for a in r.summary.get(PER_CLIENT, {}).get(key, [])]
                for label, runs in res.configs.items()}

    shared, personal = pooled("accuracy"), pooled("personal")
    if not any(shared.values()):
        return None
    personalises = any(personal[k] and personal[k] != shared[k] for k in shared)
    fig = Figure(figsize=(max(5, (1.2 if personalises else 0.8) * len(shared) + 2), 4), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    x = np.arange(len(shared), dtype=float)
    boxes = [(shared, 0.0, "global model", "tab:blue")]
    if personalises:
        boxes = [(shared, -0.2, "global model", "tab:blue"), (personal, 0.2, "personalised", "tab:orange")]
    for data, offset, name, colour in boxes:
        parts = ax.boxplot([v or [math.nan] for v in data.values()], positions=x + offset,
                           widths=0.35 if personalises else 0.5, patch_artist=True)
        for box in parts["boxes"]:
            box.set(facecolor=colour, alpha=0.35)
        parts["boxes"][0].set_label(name)
    ax.set_xticks(x, [names[k] for k in shared])
    ax.set(ylabel="client accuracy (own test images)", ylim=(0, 1), title="per-client accuracy spread")
    if personalises:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_domains(res: StudyResults, path: Path) -> Path | None:
    """Final accuracy per domain style, per configuration."""
    per = {label: [r.summary.get(FINAL_ACCURACY_PER_STYLE, {}) for r in runs] for label, runs in res.configs.items()}
    styles = sorted({s for dicts in per.values() for d in dicts for s in d})
    if not styles:
        return None
    fig = Figure(figsize=(max(6, 1.2 * len(styles) + 2), 4), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    width = 0.8 / max(1, len(per))
    for i, (label, dicts) in enumerate(per.items()):
        means = [statistics.mean(d.get(s, math.nan) for d in dicts) for s in styles]
        ax.bar(np.arange(len(styles)) + i * width, means, width, label=names[label])
    ax.set_xticks(np.arange(len(styles)) + 0.4 - width / 2, styles)
    ax.set(ylabel="final test accuracy", ylim=(0, 1), title="accuracy per domain (acquisition style)")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _paired_bars(res: StudyResults, pairs: Mapping[str, tuple[list[float], list[float]]], legends: tuple[str, str],
                 ylabel: str, title: str, path: Path) -> Path | None:
    """Two bars per configuration (mean ± std over seeds); configurations without both values are left out."""
    pairs = {k: v for k, v in pairs.items() if v[0] and v[1]}
    if not pairs:
        return None
    fig = Figure(figsize=(max(5, 0.9 * len(pairs) + 2), 4), dpi=110)
    ax = fig.subplots()
    names = short_names(res)
    x = np.arange(len(pairs))
    for offset, idx, legend in ((-0.2, 0, legends[0]), (0.2, 1, legends[1])):
        ax.bar(x + offset, [statistics.mean(v[idx]) for v in pairs.values()], 0.4, label=legend, capsize=3,
               yerr=[statistics.stdev(v[idx]) if len(v[idx]) > 1 else 0.0 for v in pairs.values()])
    ax.set_xticks(x, [names[k] for k in pairs])
    ax.set(ylabel=ylabel, ylim=(0, 1), title=title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_scratch(res: StudyResults, path: Path) -> Path | None:
    """Final accuracy pre-trained vs from scratch, mean ± std over seeds."""
    pairs = {label: ([r.summary[FINAL_ACCURACY] for r in runs],
                     [r.scratch.summary[FINAL_ACCURACY] for r in runs if r.scratch is not None])
             for label, runs in res.configs.items()}
    return _paired_bars(res, pairs, ("pre-trained", "scratch"), "final test accuracy", "pre-trained vs from scratch",
                        path)


def plot_adaptability(res: StudyResults, path: Path) -> Path | None:
    """Held-out clients' accuracy of the final model, before and after their local fine-tuning."""
    held = {label: [r.summary[HELD_OUT_CLIENTS] for r in runs if HELD_OUT_CLIENTS in r.summary]
            for label, runs in res.configs.items()}
    pairs = {label: ([h[HELD_OUT_BEFORE_MEAN] for h in hs], [h[HELD_OUT_AFTER_MEAN] for h in hs])
             for label, hs in held.items()}
    return _paired_bars(res, pairs, ("before", "after local fine-tuning"), "held-out clients' accuracy",
                        "adaptability: clients held out of training", path)


def plot_confusions(matrices: Mapping[str, np.ndarray], path: Path) -> Path:
    """One confusion matrix (rows: true class, columns: predicted) per configuration."""
    n = len(matrices)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, m) in zip(axes, matrices.items()):
        ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set(title=name, xlabel="predicted", ylabel="true")
        ax.set_xticks(range(len(m)))
        ax.set_yticks(range(len(m)))
        ax.tick_params(labelsize=6)
    for ax in axes[n:]:
        ax.axis("off")
    return _save(fig, path)


def plot_saliency(images: torch.Tensor, captions: Sequence[str], maps: Mapping[str, torch.Tensor],
                  path: Path) -> Path:
    """Each test image (rows) beside the gradient × input map of each model (columns)."""
    rows, cols = len(images), 1 + len(maps)
    fig = Figure(figsize=(1.8 * cols, 1.8 * rows), dpi=100)
    axes = np.atleast_2d(fig.subplots(rows, cols))
    for i in range(rows):
        axes[i, 0].imshow(images[i].mean(0), cmap="gray")
        axes[i, 0].set_ylabel(captions[i], fontsize=7)
        for j, (name, m) in enumerate(maps.items(), start=1):
            lim = float(m[i].abs().max()) or 1.0
            axes[i, j].imshow(m[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=8)
    return _save(fig, path)
