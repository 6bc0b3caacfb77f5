"""What differential privacy costs: accuracy per epsilon (pre-trained vs scratch), and DP-SGD's time.

Part 1 runs the real simulation (Flower + Ray) of ``experiments/privacy.toml`` for each
target epsilon (and without DP), pre-trained (feature extraction) and from scratch
(full fine-tuning, the same DP-SGD), for each seed.

Part 2 times one client's local round, plain SGD vs DP-SGD (Opacus hooks, ghost
clipping), interleaved in one process; it reports ratios to plain SGD (medians).

    .venv/bin/python benchmarks/privacy.py [--seeds 0 1] [--epsilons 1 3 8] [--reps 7] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedtl.clients.dp_sgd import initial_state, train_private
from fedtl.clients.trainer import train_local
from fedtl.config import ExperimentConfig, load_config
from fedtl.data.federated import client_data
from fedtl.models.factory import build_model
from fedtl.server.plan import plan_round
from fedtl.simulations.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "privacy.toml"


def _stat(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def utility(args: argparse.Namespace) -> None:
    settings = [(f"ε={e:g}", ["privacy.mode=dp-sgd", f"target-epsilon={e}"]) for e in args.epsilons]
    settings.append(("no DP", ["privacy.mode=off"]))
    results: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        for label, sets in settings:
            cfg = load_config(CONFIG, [*args.sets, *sets, f"seed={seed}"])
            for init, run in (("pre-trained", cfg), ("scratch", cfg.as_scratch())):
                out = args.out / f"{label.replace('=', '')}-{init}-s{seed}"
                acc = simulate(run.replace(out=str(out)), overwrite=True)["final_accuracy"]
                results.setdefault(label, {}).setdefault(init, []).append(acc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy_utility.json").write_text(json.dumps(results, indent=2))
    base = load_config(CONFIG, args.sets)
    print(f"\nFinal test accuracy, {base.rounds} rounds, {base.clients} clients, all labelled images, "
          f"delta {base.privacy.delta:g}; seeds {args.seeds}\n")
    print("| privacy | pre-trained (feature extraction) | scratch (full) | transfer gain |")
    print("|---|---|---|---|")
    for label, _ in settings:
        pre, scr = results[label]["pre-trained"], results[label]["scratch"]
        print(f"| {label} | {_stat(pre)} | {_stat(scr)} | {_stat([a - b for a, b in zip(pre, scr)])} |")


def _round_timer(cfg: ExperimentConfig, engine: str | None) -> Callable[[], float]:
    model = build_model(cfg)
    plan = plan_round(cfg, model.block_names, 1)
    model.set_trainable(plan.trainable_blocks)
    data = client_data(cfg.data, 0, cfg.clients, cfg.seed)
    dp_cfg = load_config(CONFIG, ["privacy.mode=dp-sgd", f"privacy.grad-sample-mode={engine or 'hooks'}",
                                  f"finetune.mode={cfg.finetune.mode}"])
    state = initial_state(dp_cfg, len(data))

    def once() -> float:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if engine is None:
            train_local(m, data, plan, cfg.finetune, seed=0)
        else:
            train_private(m, data, plan, dp_cfg, state)
        return time.perf_counter() - t0

    return once


def overhead(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # as a simulated client runs
    print(f"\nOne client's local round, 1 thread; median of {args.reps} interleaved repetitions; "
          "ratio to plain SGD in the same mode\n")
    print("| mode | plain SGD (s) | DP-SGD hooks | DP-SGD ghost clipping |")
    print("|---|---|---|---|")
    for mode in ("feature-extraction", "full"):
        cfg = load_config(CONFIG, [*args.sets, f"finetune.mode={mode}"])
        timers = {name: _round_timer(cfg, engine) for name, engine in
                  (("plain", None), ("hooks", "hooks"), ("ghost", "ghost"))}
        for timer in timers.values():
            timer()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(args.reps):
            for name, timer in timers.items():
                times[name].append(timer())
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {mode} | {med['plain']:.3f} | {med['hooks'] / med['plain']:.2f}× | "
              f"{med['ghost'] / med['plain']:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override, key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-privacy")
    parser.add_argument("--only", choices=["utility", "overhead"], default=None)
    args = parser.parse_args()
    if args.only != "overhead":
        utility(args)
    if args.only != "utility":
        overhead(args)


if __name__ == "__main__":
    main()
