"""A study's results as one table: one row per configuration, mean ± std over seeds.

Reads only what runs wrote (``summary.json``, ``metrics.jsonl``), so a report can be
rebuilt at any time from the folders. Also writes the table as CSV and Markdown.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtl.errors import StudyError
from fedtl.reports.runs import read_metrics
from fedtl.run_folder import (
    BEST_ACCURACY,
    BEST_ROUND,
    BYTES_DOWN,
    BYTES_DOWN_TOTAL,
    BYTES_UP,
    BYTES_UP_TOTAL,
    EPSILON_MAX,
    EPSILON_MAX_BY_ACCOUNTANT,
    EPSILON_MAX_TIGHTEST,
    EPSILON_REPLACE_ONE,
    FINAL_ACCURACY,
    HELD_OUT_AFTER_MEAN,
    HELD_OUT_BEFORE_MEAN,
    HELD_OUT_CLIENTS,
    PER_CLIENT,
    PER_CLIENT_ACCURACY_MEAN,
    PER_CLIENT_ACCURACY_WORST10,
    PER_CLIENT_PERSONAL_MEAN,
    PER_CLIENT_PERSONAL_WORST10,
    PLAN_FILE,
    PLAN_SCRATCH_DIR,
    PLAN_TARGET_ACCURACY,
    SUMMARY_FILE,
    TOTAL_PARAMS,
    TRANSFER_GAIN,
    TRAVELLING_PARAMS,
    TRAVELLING_RATIO,
    WALL_SECONDS,
)


@dataclass
class RunResult:
    """One finished run: its summary, metrics rows and folder (``scratch`` is its baseline's)."""

    label: str
    seed: int
    dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    scratch: RunResult | None = None


@dataclass
class StudyResults:
    """Every finished run of a study, grouped by configuration (in plan order)."""

    name: str
    command: str
    out: Path
    target_accuracy: float
    configs: dict[str, list[RunResult]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _load_run(out: Path, rel: str, label: str, seed: int) -> RunResult | None:
    folder = out / rel
    if not (folder / SUMMARY_FILE).is_file():
        return None
    return RunResult(label, seed, folder, json.loads((folder / SUMMARY_FILE).read_text()), read_metrics(folder))


def load_results(study_dir: str | Path) -> StudyResults:
    """The finished runs of the study in ``study_dir`` (unfinished ones are listed in ``missing``).

    Raises
    ------
    StudyError
        If the folder holds no study plan.
    """
    out = Path(study_dir).resolve()
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise StudyError(f"{out} holds no study ({PLAN_FILE} is missing): run `fedtl study FILE` first")
    plan = json.loads(plan_path.read_text())
    res = StudyResults(plan["name"], plan["command"], out, float(plan.get(PLAN_TARGET_ACCURACY, 0.0)),
                       skipped=list(plan.get("skipped", [])))
    for entry in plan["runs"]:
        run = _load_run(out, entry["dir"], entry["label"], entry["seed"])
        if run is None:
            res.missing.append(entry["dir"])
            continue
        if entry.get(PLAN_SCRATCH_DIR):
            run.scratch = _load_run(out, entry[PLAN_SCRATCH_DIR], "scratch", entry["seed"])
            if run.scratch is None:
                res.missing.append(entry[PLAN_SCRATCH_DIR])
        res.configs.setdefault(entry["label"], []).append(run)
    return res


# -- per-run figures -------------------------------------------------------------------
def bytes_per_round(run: RunResult) -> float:
    """Mean bytes sent and received per trained round."""
    trained = [r for r in run.rows if r["round"] > 0]
    return statistics.mean(r[BYTES_DOWN] + r[BYTES_UP] for r in trained) if trained else 0.0


def to_target(run: RunResult, target: float) -> dict[str, float]:
    """Round, seconds and bytes until the test accuracy first reaches ``target`` (NaN if never).

    Round 0 counts only where the clients sent something in it (a head start, ``finetune.head-init = "ncm"``):
    a seeded random head is nothing anyone trained.
    """
    total = 0.0
    for r in run.rows:
        total += r[BYTES_DOWN] + r[BYTES_UP]
        if (r["round"] > 0 or r[BYTES_UP] > 0) and r["accuracy"] >= target:
            return {"round": r["round"], "seconds": r[WALL_SECONDS], "bytes": total}
    return {"round": math.nan, "seconds": math.nan, "bytes": math.nan}


def epsilon(run: RunResult) -> float:
    """The run's largest epsilon; infinity without DP."""
    value = run.summary.get("privacy", {}).get(EPSILON_MAX)
    return math.inf if value is None else float(value)  # null: an infinite epsilon, as strict JSON writes it


def _get(*path: str) -> Callable[[RunResult], float]:
    """The summary's number at ``path`` (a key, then keys of the sections it holds), NaN where there is none."""
    def read(run: RunResult) -> float:
        value: Any = run.summary
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return float(value) if isinstance(value, (int, float)) else math.nan
    return read


# Column -> (header, per-run value, format). Mean ± std over seeds.
COLUMNS: dict[str, tuple[str, Callable[[RunResult], float], str]] = {
    FINAL_ACCURACY: ("final accuracy", _get(FINAL_ACCURACY), "{:.3f}"),
    BEST_ACCURACY: ("best accuracy", _get(BEST_ACCURACY), "{:.3f}"),
    TRANSFER_GAIN: ("transfer gain", lambda r: (r.summary[FINAL_ACCURACY] - r.scratch.summary[FINAL_ACCURACY])
                    if r.scratch else math.nan, "{:+.3f}"),
    "client_accuracy_mean": ("client accuracy", _get(PER_CLIENT, PER_CLIENT_ACCURACY_MEAN), "{:.3f}"),
    "client_accuracy_worst10": ("worst-10 % client accuracy", _get(PER_CLIENT, PER_CLIENT_ACCURACY_WORST10),
                                "{:.3f}"),
    "personal_accuracy_mean": ("personalised accuracy", _get(PER_CLIENT, PER_CLIENT_PERSONAL_MEAN), "{:.3f}"),
    "personal_accuracy_worst10": ("worst-10 % personalised", _get(PER_CLIENT, PER_CLIENT_PERSONAL_WORST10),
                                  "{:.3f}"),
    "held_out_before": ("held-out accuracy before", _get(HELD_OUT_CLIENTS, HELD_OUT_BEFORE_MEAN), "{:.3f}"),
    "held_out_after": ("held-out accuracy after local fine-tuning", _get(HELD_OUT_CLIENTS, HELD_OUT_AFTER_MEAN),
                       "{:.3f}"),
    "ece": ("ECE", lambda r: float(r.rows[-1].get("ece", math.nan)), "{:.3f}"),
    "bytes_per_round": ("bytes per round", bytes_per_round, "{:,.0f}"),
    TRAVELLING_RATIO: ("travelling / model", _get(TRAVELLING_RATIO), "{:.2%}"),
    "bytes_total": ("bytes in total", lambda r: r.summary[BYTES_DOWN_TOTAL] + r.summary[BYTES_UP_TOTAL],
                    "{:,.0f}"),
    WALL_SECONDS: ("wall time (s)", _get(WALL_SECONDS), "{:.1f}"),
    "epsilon": ("epsilon", epsilon, "{:.4g}"),
    # DP-SGD: the largest client's steps under each of Opacus's accountants, side by side (summary.json).
    "epsilon_rdp": ("ε ≤ (RDP)", _get("privacy", EPSILON_MAX_BY_ACCOUNTANT, "rdp"), "{:.4g}"),
    "epsilon_prv": ("ε ≤ (PRV)", _get("privacy", EPSILON_MAX_BY_ACCOUNTANT, "prv"), "{:.4g}"),
    "epsilon_gdp": ("ε ≈ (GDP)", _get("privacy", EPSILON_MAX_BY_ACCOUNTANT, "gdp"), "{:.4g}"),
    # Every client's smaller of its RDP and PRV bounds, the largest over clients (add-or-remove).
    "epsilon_tightest": ("ε ≤ (tighter of RDP, PRV)", _get("privacy", EPSILON_MAX_TIGHTEST), "{:.4g}"),
    # What the guarantee states: replace-one (the count is published; client-level: a client's updates replaced).
    EPSILON_REPLACE_ONE: ("ε ≤ (replace-one)", _get("privacy", EPSILON_REPLACE_ONE), "{:.4g}"),
}


def _cell(values: Sequence[float], fmt: str) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "—"
    if any(math.isinf(v) for v in finite):
        return "∞"
    mean = statistics.mean(finite)
    cell = fmt.format(mean) if len(finite) == 1 else \
        f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(finite)).lstrip('+')}"
    # e.g. a target that only some seeds reached: say how many the figure is over.
    return cell if len(finite) == len(values) else f"{cell} ({len(finite)}/{len(values)} seeds)"


def target_accuracy(res: StudyResults) -> float:
    """The study's target: as configured, else 90 % of the best configuration's mean final accuracy."""
    if res.target_accuracy > 0:
        return res.target_accuracy
    means = [statistics.mean(r.summary[FINAL_ACCURACY] for r in runs) for runs in res.configs.values()]
    return 0.9 * max(means, default=0.0)


def table(res: StudyResults) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (columns no run has a value for are left out)."""
    target = target_accuracy(res)
    columns = {**COLUMNS,
               "rounds_to_target": (f"rounds to {target:.3f}", lambda r: to_target(r, target)["round"], "{:.1f}"),
               "seconds_to_target": (f"seconds to {target:.3f}", lambda r: to_target(r, target)["seconds"], "{:.1f}"),
               "bytes_to_target": (f"bytes to {target:.3f}", lambda r: to_target(r, target)["bytes"], "{:,.0f}")}
    values = {key: {label: [get(r) for r in runs] for label, runs in res.configs.items()}
              for key, (_, get, _) in columns.items()}
    kept = [k for k in columns if any(not math.isnan(v) for vs in values[k].values() for v in vs)]
    header = ["configuration", "seeds", *(columns[k][0] for k in kept)]
    rows = [[label, str(len(runs)), *(_cell(values[k][label], columns[k][2]) for k in kept)]
            for label, runs in res.configs.items()]
    return header, rows


def write_tables(res: StudyResults, folder: Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = table(res)
    csv_path, md_path = folder / "results.csv", folder / "results.md"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md_path.write_text(markdown_table(header, rows) + "\n")
    return csv_path, md_path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``rows`` under ``header`` (cells as given, none cut)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


# Summary fields ``fedtl compare`` shows, with their format.
COMPARED = ((FINAL_ACCURACY, "{:.4f}"), (BEST_ACCURACY, "{:.4f}"), (BEST_ROUND, "{}"), ("rounds", "{}"),
            (TRANSFER_GAIN, "{:+.4f}"), (BYTES_DOWN_TOTAL, "{:,}"), (BYTES_UP_TOTAL, "{:,}"),
            (TRAVELLING_PARAMS, "{:,}"), (TOTAL_PARAMS, "{:,}"), (TRAVELLING_RATIO, "{:.2%}"),
            (WALL_SECONDS, "{:.1f}"))


def compare_runs(a: str | Path, b: str | Path) -> tuple[list[str], list[list[str]]]:
    """Two run folders side by side: header and rows (field, run a, run b, b - a).

    Raises
    ------
    StudyError
        If a folder holds no finished run.
    """
    summaries = []
    for folder in (Path(a), Path(b)):
        if not (folder / SUMMARY_FILE).is_file():
            raise StudyError(f"{folder} holds no finished run (no {SUMMARY_FILE}): give a run folder, e.g. runs/<name>")
        summaries.append(json.loads((folder / SUMMARY_FILE).read_text()))
    first, second = summaries
    fields = [("mode", "{}"), ("init", "{}"), ("strategy", "{}"), ("personalisation", "{}"), ("backbone", "{}"),
              ("clients", "{}"), *COMPARED]
    rows = []
    for key, fmt in fields:
        if key not in first and key not in second:
            continue
        va, vb = first.get(key), second.get(key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        delta = fmt.format(vb - va) if numbers and fmt != "{}" else ""
        rows.append([key, "—" if va is None else fmt.format(va), "—" if vb is None else fmt.format(vb), delta])
    eps = [s.get("privacy", {}).get(EPSILON_MAX) for s in summaries]
    rows.append(["epsilon", *("∞" if e is None else f"{e:.4g}" for e in eps), ""])
    return ["", str(a), str(b), "b - a"], rows
