"""The per-backbone head-start table of docs/studies.md, from a finished imagenet-transfer study folder.

    .venv/bin/python docs/results/imagenet-transfer/per_backbone.py runs/study-imagenet-transfer \
        > docs/results/imagenet-transfer/per-backbone.md

Per configuration: test accuracy after rounds 0, 1, 5 and 10 (mean over seeds); the rounds and bytes until
it first reaches its backbone's feature-extraction mean final accuracy, and 90 % of its backbone's best
mean final accuracy (``fedtl.reports.results.to_target``: round 0 counts where a head start was sent).
"""

from __future__ import annotations

import statistics
import sys

from fedtl.reports.results import load_results, to_target


def backbone(label: str) -> str:
    return label.split(",")[0].split("=")[1]


def cell(values: list[float], fmt: str) -> str:
    reached = [v for v in values if v == v]  # NaN: never reached
    if not reached:
        return "—"
    text = fmt.format(statistics.mean(reached))
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)} seeds)"


def main(study: str) -> None:
    res = load_results(study)
    finals = {label: statistics.mean(r.summary["final_accuracy"] for r in runs) for label, runs in res.configs.items()}
    fe = {backbone(label): f for label, f in finals.items() if label.endswith("mode=feature-extraction")}
    best = {b: max(f for label, f in finals.items() if backbone(label) == b) for b in fe}
    print("| backbone | mode | head | round 0 | round 1 | round 5 | round 10 | rounds to FE's final | "
          "bytes to FE's final | rounds to 90 % of best | bytes to 90 % of best |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, runs in res.configs.items():
        b = backbone(label)
        mode = label.split("finetune.mode=")[1].split(",")[0]
        head = "ncm" if "head-init=ncm" in label else "random"
        accuracy = [cell([r.rows[k]["accuracy"] for r in runs], "{:.3f}") for k in (0, 1, 5, 10)]
        to_fe = [to_target(r, fe[b]) for r in runs]
        to_best = [to_target(r, 0.9 * best[b]) for r in runs]
        print(f"| {b} | {mode} | {head} | {' | '.join(accuracy)} | {cell([x['round'] for x in to_fe], '{:.1f}')} | "
              f"{cell([x['bytes'] for x in to_fe], '{:,.0f}')} | {cell([x['round'] for x in to_best], '{:.1f}')} | "
              f"{cell([x['bytes'] for x in to_best], '{:,.0f}')} |")
    print()
    print("Feature extraction's final: " + ", ".join(f"{b} {f:.3f}" for b, f in fe.items())
          + "; 90 % of the best: " + ", ".join(f"{b} {0.9 * f:.3f}" for b, f in best.items()))


if __name__ == "__main__":
    main(sys.argv[1])
