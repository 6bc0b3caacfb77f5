"""The run folder: resolved config, one metrics line per round, checkpoints, summary.

Each line and checkpoint is written as soon as the round ends, so a run that fails
later keeps everything computed so far. Nothing is printed that is not also saved.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save

from fedtl.config import ExperimentConfig
from fedtl.errors import RunFolderError
from fedtl.privacy import privacy_mode
from fedtl.protocol import ACCURACY, ACCURACY_BEFORE, ACCURACY_PERSONAL, DECLINED, HELD_OUT, NODE_ID, PARTITION_ID
from fedtl.reports.runs import holds_run, read_metrics, to_json, write_atomic
from fedtl.run_folder import (
    BEST_ACCURACY,
    BEST_ROUND,
    BYTES_DOWN,
    BYTES_DOWN_TOTAL,
    BYTES_UP,
    BYTES_UP_TOTAL,
    CHECKPOINTS_DIR,
    CLIENTS_FAILED,
    CLIENTS_FILE,
    CLIENTS_OK,
    CONFIG_FILE,
    EVALUATION_DECLINED,
    FINAL_ACCURACY,
    FINAL_ACCURACY_PER_STYLE,
    FINAL_EVALUATION,
    FINAL_LOSS,
    HELD_OUT_AFTER,
    HELD_OUT_AFTER_MEAN,
    HELD_OUT_BEFORE,
    HELD_OUT_BEFORE_MEAN,
    HELD_OUT_CLIENTS,
    MEAN_SUFFIX,
    METRICS_FILE,
    OUT_DIR,
    PER_CLIENT,
    ROUND_TRAIN_LOSS,
    STD_SUFFIX,
    SUMMARY_FILE,
    WALL_SECONDS,
    WORST10_SUFFIX,
)

SUMMARY_SCHEMA = 1
# (metrics key, column label, format): the live table, at most 79 characters wide; the
# epsilon column only under DP.
_COLUMNS = [("round", "round", "{:>5}"), (ACCURACY, "accuracy", "{:>8.4f}"), ("loss", "loss", "{:>6.3f}"),
            (ROUND_TRAIN_LOSS, "t-loss", "{:>6.3f}"), (BYTES_DOWN, "bytes-down", "{:>10.0f}"),
            (BYTES_UP, "bytes-up", "{:>9.0f}"), (CLIENTS_OK, "clients", "{:>7.0f}"), ("epsilon", "epsilon", "{:>7.3g}"),
            (WALL_SECONDS, "secs", "{:>5.1f}")]


@dataclass(frozen=True)
class Terminal:
    """Where a run's round table goes: ``console`` (default stdout), ``quiet`` when the process's own
    output belongs to the run's log, and every ``table_every``-th round printed (all are saved)."""

    console: Console | None = None
    quiet: bool = False
    table_every: int = 1


class RunRecorder:
    """Writes one run folder and shows the run's progress.

    Parameters
    ----------
    out_dir : Path
        The run folder (created). One that already holds a run is refused.
    cfg : ExperimentConfig
        Written as ``config.toml``.
    resume_round : int, optional
        Resume the run already in ``out_dir`` after this round: its lines up to the round are kept.
    terminal : Terminal, optional
        Where the per-round table and progress bar go (default: stdout, Flower's log around them). A
        ``quiet`` one is the terminal of a quiet run (``fedtl.simulations.logs``): the bar does not take
        over the process's stdout and stderr, which belong to the run's log.
    """

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, terminal: Terminal | None = None,
                 resume_round: int | None = None) -> None:
        t = terminal or Terminal()
        quiet = t.quiet
        self.out = Path(out_dir)
        self.metrics_path = self.out / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        if resume_round is None:
            if holds_run(self.out):
                raise RunFolderError(f"{self.out} already holds a run; choose another folder (--out / out) or "
                                     "remove it")
            (self.out / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / CONFIG_FILE, cfg.to_toml())
        else:  # the rounds after the checkpoint run again: their lines go
            self.rows = [r for r in read_metrics(self.out) if r["round"] <= resume_round]
        write_atomic(self.metrics_path, "".join(to_json(r) + "\n" for r in self.rows))
        self.cfg = cfg
        self.console = t.console or Console()
        self.table_every = t.table_every
        self._pending: dict[int, dict[str, Any]] = {}  # figures, and CLIENT_ERRORS: a list of reasons
        self.client_evaluation: list[dict[str, Any]] = []
        self.evaluation_sample: dict[str, int] | None = None  # asked, of how many nodes
        # A resumed run's clock goes on from its last line: wall_seconds stays the run's time.
        self._t0 = time.perf_counter() - (self.rows[-1][WALL_SECONDS] if self.rows else 0.0)
        title = f"{cfg.name}: {cfg.finetune.mode}, {cfg.init}"
        self.console.print(f"[bold]{title}[/] -> {self.out}")
        self.columns = [c for c in _COLUMNS if c[0] != "epsilon" or privacy_mode(cfg).accounted]
        self.console.print("  ".join(label.rjust(len(fmt.format(0))) for _, label, fmt in self.columns))
        self._progress = Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  console=self.console, transient=True, redirect_stdout=not quiet,
                                  redirect_stderr=not quiet)
        self._task = self._progress.add_task("rounds", total=cfg.rounds, completed=resume_round or 0)
        self._progress.start()
        self._rerouted = [] if quiet else self._route_flower_log_above_the_bar()

    @staticmethod
    def _route_flower_log_above_the_bar() -> list[tuple[logging.StreamHandler, Any]]:
        # On a terminal the live bar swaps sys.stderr for a proxy that prints above it, but
        # Flower's log handler kept the stream it was made with and would write through the
        # bar. Point it at the proxy while the bar lives; nothing is dropped.
        if sys.stderr is sys.__stderr__:  # no live bar (not a terminal): nothing to do
            return []
        return [(h, h.setStream(sys.stderr)) for h in logging.getLogger("flwr").handlers
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__]

    def on_client_evaluation(self, rnd: int, clients: list[dict[str, Any]], sample: tuple[int, int] = (0, 0)) -> None:
        """Keep (and write to ``clients.jsonl``) the evaluation of the final model by every node that answered;
        ``sample``: how many nodes were asked, of how many (``summary.json``'s ``final_evaluation``)."""
        self.client_evaluation = sorted(clients, key=lambda c: (c.get(PARTITION_ID, -1), c[NODE_ID]))
        self.evaluation_sample = {"asked": sample[0], "nodes": sample[1]}
        write_atomic(self.out / CLIENTS_FILE, "".join(to_json({"round": rnd, **c}) + "\n"
                                                         for c in self.client_evaluation))

    def on_train(self, rnd: int, info: dict[str, Any]) -> None:
        """Keep a round's traffic and training figures until its evaluation ends the round."""
        self._pending[rnd] = info

    def end_round(self, rnd: int, evaluation: dict[str, float], **extra: float) -> dict[str, Any]:
        """Write round ``rnd``'s line (round 0 = the model before any training) and print it."""
        base = {BYTES_DOWN: 0, BYTES_UP: 0, CLIENTS_OK: 0, CLIENTS_FAILED: 0}
        row: dict[str, Any] = {"round": rnd, **base, **self._pending.pop(rnd, {}), **evaluation, **extra,
                               WALL_SECONDS: time.perf_counter() - self._t0}
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(to_json(row) + "\n")
        if rnd % self.table_every == 0 or rnd == self.cfg.rounds:
            cells = [fmt.format(row[key]) if key in row else " " * len(fmt.format(0)) for key, _, fmt in self.columns]
            self._progress.console.print("  ".join(cells))
        self._progress.update(self._task, completed=rnd)
        return row

    def checkpoint(self, file: str, state: dict[str, torch.Tensor], **meta: Any) -> Path:
        """Save a full model state as ``checkpoints/<file>`` (``LAST_CHECKPOINT``, ``BEST_CHECKPOINT``) with
        metadata."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        data = save(tensors, metadata={k: to_json(v) for k, v in meta.items()})
        return write_atomic(self.out / CHECKPOINTS_DIR / file, data)

    def close(self) -> None:
        """Stop the progress display and give Flower's log its stream back (idempotent)."""
        for handler, original in self._rerouted:
            handler.setStream(original)
        self._rerouted = []
        self._progress.stop()

    def finish(self, **fields: Any) -> dict[str, Any]:
        """Write ``summary.json`` from the rows and ``fields``; stop the progress display."""
        self.close()
        trained = [r for r in self.rows if r["round"] > 0]
        last = self.rows[-1]
        best = max(trained or self.rows, key=lambda r: r[ACCURACY])
        summary = {
            "schema": SUMMARY_SCHEMA, "name": self.cfg.name, "mode": self.cfg.finetune.mode, "init": self.cfg.init,
            "backbone": self.cfg.model.backbone, "strategy": self.cfg.strategy.name, "clients": self.cfg.clients,
            "rounds": last["round"], FINAL_ACCURACY: last[ACCURACY], FINAL_LOSS: last["loss"],
            BEST_ACCURACY: best[ACCURACY], BEST_ROUND: best["round"],
            FINAL_ACCURACY_PER_STYLE: {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{ACCURACY}/")},
            BYTES_DOWN_TOTAL: sum(r[BYTES_DOWN] for r in self.rows),
            BYTES_UP_TOTAL: sum(r[BYTES_UP] for r in self.rows),
            WALL_SECONDS: time.perf_counter() - self._t0, OUT_DIR: str(self.out),
            **client_summary(self.client_evaluation), **fields,
            **({FINAL_EVALUATION: self.evaluation_sample} if self.evaluation_sample else {}),
        }
        write_summary(self.out, summary)
        return summary


def fairness(values: list[float], name: str) -> dict[str, Any]:
    """``name`` (the values), ``name_mean``, ``name_std`` (over clients) and ``name_worst10``: the mean
    of the worst 10 % of clients (at least one)."""
    worst = sorted(values)[:max(1, math.ceil(0.1 * len(values)))]
    return {name: values, name + MEAN_SUFFIX: statistics.mean(values), name + STD_SUFFIX: statistics.pstdev(values),
            name + WORST10_SUFFIX: statistics.mean(worst)}


def client_summary(clients: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``per_client`` and ``held_out`` sections of a summary, from the nodes' final evaluation.

    ``per_client`` holds the global model's accuracy on each training client's own test
    images and, where clients report it, their personalised model's (``personal_*``), each
    with the fairness figures of ``fairness``. ``evaluation_declined``: the nodes whose privacy gate declined
    the evaluation, with their reasons.
    """
    out: dict[str, dict[str, Any]] = {}
    label = [c.get(PARTITION_ID, f"node-{c[NODE_ID]}") for c in clients]
    train = [(i, c) for i, c in zip(label, clients) if not c.get(HELD_OUT) and ACCURACY in c]
    if train:
        section: dict[str, Any] = {"ids": [i for i, _ in train]}
        for name, key in (("accuracy", ACCURACY), ("personal", ACCURACY_PERSONAL)):
            if all(key in c for _, c in train):
                section.update(fairness([c[key] for _, c in train], name))
        out[PER_CLIENT] = section
    held = [(i, c) for i, c in zip(label, clients) if c.get(HELD_OUT) and ACCURACY in c]
    if held:
        before, after = [c[ACCURACY_BEFORE] for _, c in held], [c[ACCURACY] for _, c in held]
        out[HELD_OUT_CLIENTS] = {"ids": [i for i, _ in held], HELD_OUT_BEFORE: before, HELD_OUT_AFTER: after,
                                 HELD_OUT_BEFORE_MEAN: statistics.mean(before),
                                 HELD_OUT_AFTER_MEAN: statistics.mean(after)}
    refused = {str(i): c[DECLINED] for i, c in zip(label, clients) if DECLINED in c}  # their privacy gates said no
    if refused:
        out[EVALUATION_DECLINED] = refused
    return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (sorted keys, so diffs between runs read well)."""
    write_atomic(Path(run_dir) / SUMMARY_FILE, to_json(summary, indent=2, sort_keys=True) + "\n")
