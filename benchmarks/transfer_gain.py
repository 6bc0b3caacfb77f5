"""Transfer gain of every fine-tuning mode over from-scratch training, on the default study.

Runs the real simulation (Flower + Ray) for each mode and seed, and the from-scratch
baseline once per seed, all in one process so every number comes from the same machine
state. Prints a Markdown table and writes the raw numbers as JSON.

    .venv/bin/python benchmarks/transfer_gain.py [--seeds 0 1 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedtl.config import load_config
from fedtl.models.modes import MODES
from fedtl.simulations.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


def _stat(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override, key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-transfer-gain")
    args = parser.parse_args()

    base = load_config(ROOT / "experiments" / "digits.toml", args.sets)
    results: dict[str, dict[int, float]] = {}
    for seed in args.seeds:
        cfg = base.replace(seed=seed)
        scratch = cfg.as_scratch().replace(out=str(args.out / f"scratch-s{seed}"))
        results.setdefault("scratch", {})[seed] = simulate(scratch, overwrite=True)["final_accuracy"]
        for mode in MODES.names():
            run = load_config(ROOT / "experiments" / "digits.toml", [*args.sets, f"finetune.mode={mode}", f"seed={seed}"])
            run = run.replace(out=str(args.out / f"{mode}-s{seed}"))
            results.setdefault(mode, {})[seed] = simulate(run, overwrite=True)["final_accuracy"]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer_gain.json").write_text(json.dumps(results, indent=2))
    seeds = args.seeds
    print(f"\nFinal test accuracy after {base.rounds} rounds, {base.clients} clients, "
          f"{base.data.labelled_per_client} labelled images each; seeds {seeds}\n")
    print("| mode | pre-trained | scratch | transfer gain | smallest gain |")
    print("|---|---|---|---|---|")
    scratch_acc = [results["scratch"][s] for s in seeds]
    for mode in MODES.names():
        acc = [results[mode][s] for s in seeds]
        gains = [a - b for a, b in zip(acc, scratch_acc)]
        print(f"| {mode} | {_stat(acc)} | {_stat(scratch_acc)} | {_stat(gains)} | {min(gains):+.3f} |")


if __name__ == "__main__":
    main()
