"""What DP-SGD costs in time: one client's local round, plain SGD vs DP-SGD (Opacus hooks, ghost clipping).

The three are timed interleaved in one process, so the machine's noise hits them alike;
it reports medians and ratios to plain SGD. (What privacy costs in accuracy is a study:
``fedtl study experiments/privacy-sweep.toml``.)

    .venv/bin/python benchmarks/privacy.py [--reps 7] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedtl.clients.dp_sgd import train_private
from fedtl.clients.spend import initial_state
from fedtl.clients.trainer import train_local
from fedtl.config import ExperimentConfig, load_config
from fedtl.data.federated import client_data
from fedtl.models.factory import build_model
from fedtl.models.modes import plan_round

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "privacy.toml"


def _round_timer(cfg: ExperimentConfig, engine: str | None) -> Callable[[], float]:
    model = build_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, 1)
    plan.apply_to(model)
    data = client_data(cfg.data, 0, cfg.clients, cfg.seed)
    dp_cfg = load_config(CONFIG, ["privacy.mode=dp-sgd", f"privacy.grad-sample-mode={engine or 'hooks'}",
                                  f"finetune.mode={cfg.finetune.mode}"])
    state = initial_state(dp_cfg.privacy, dp_cfg.finetune, dp_cfg.rounds, len(data))

    def once() -> float:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if engine is None:
            train_local(m, data, plan, cfg.finetune, seed=0)
        else:
            train_private(m, data, plan, dp_cfg.finetune, dp_cfg.privacy, state)
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
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override, key=value")
    overhead(parser.parse_args())


if __name__ == "__main__":
    main()
