"""Helpers the tests share: configs, hand-made strategies and grids, Flower messages, data files, the CLI.

One module, imported by the tests that need them (``from tests.helpers import ...``); the
environment every test runs in is set in ``conftest.py``.
"""

from __future__ import annotations

import os
import pickle  # only to write CIFAR-10's own on-disk format, which is a pickle
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.config import ExperimentConfig, load_config
from fedtl.models.factory import build_model
from fedtl.models.modes import plan_round
from fedtl.protocol import ARRAYS, CONFIG, FINGERPRINT, NUM_PARTITIONS, PARTITION_ID, SERVER_ROUND, RoundPlan
from fedtl.strategies.registry import build_strategy
from fedtl.strategies.transfer import Records, Travel, transfer_strategy

ROOT = Path(__file__).resolve().parents[1]
TMP = ROOT / ".tmp"
# Pre-trained weights are cached by their config, so one folder serves every test and rerun.
CACHE = TMP / "test-cache"


def make_config(*sets: str) -> ExperimentConfig:
    """The default config with a quick pre-training, the shared cache and ``sets`` applied."""
    return load_config(None, [f"pretrain.cache-dir={str(CACHE)!r}", "pretrain.epochs=2", *sets])


def lora_shares(cfg: ExperimentConfig, ranks: Iterable[int]) -> int:
    """The bytes HetLoRA sends nodes at ``ranks`` in a round: A's rows and B's columns cut to each, the head whole."""
    from flwr.app import ArrayRecord

    from fedtl.personalisation import run_model
    from fedtl.strategies.lora import Ranks

    model = run_model(cfg)
    reference = model.state_dict()
    sent = ArrayRecord({k: v for k, v in reference.items() if k.startswith("head.") or ".lora_" in k})
    return sum(Ranks(reference, model.adapter_keys).cut(sent, r).count_bytes() for r in ranks)


def run_fedtl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedtl.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "120"}, timeout=300)


INITIAL = {"blocks.a.w": torch.full((2,), 7.0), "head.w": torch.zeros(2, 2), "head.b": torch.zeros(2)}


UNIT_KEYS = {"a": ["blocks.a.w"], "head": ["head.w", "head.b"]}


def keys_of(units: Iterable[str]) -> list[str]:
    return [k for u in units for k in UNIT_KEYS[u]]


def plan(rnd: int) -> RoundPlan:
    """Round 1: head only; from round 2 on, block a joins (gradual unfreezing)."""
    return RoundPlan({"head": 0.1} if rnd == 1 else {"a": 0.01, "head": 0.1}, local_epochs=1)


class StaticGrid(Grid):
    """A Grid with a fixed set of connected nodes: FedAvg's sampling reads only that."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def _unused(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("configuring a round needs only get_node_ids")

    create_message = pull_messages = push_messages = send_and_receive = set_run = _unused
    run = property(_unused)


TRAVEL = Travel(plan=plan, keys_of=keys_of, initial_state=INITIAL, fingerprint="f00d")


def strategy(observed: list | None = None, inner: Strategy | None = None) -> Strategy:
    """The transfer strategy around ``inner`` (default: FedAvg) on ``INITIAL``; ``observed`` collects each round's
    (round, totals)."""
    observer = (lambda report: observed.append((report.round, report.totals))) if observed is not None else None
    return transfer_strategy(inner or build_strategy(make_config("clients=3")), TRAVEL, records=Records(observer))


def configure_round_one(s: Strategy, nodes: list[int]) -> list[Message]:
    """Round 1's training messages (the head travels, at its initial values) to ``nodes``."""
    return list(s.configure_train(1, ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])}), ConfigRecord(),
                                  StaticGrid(nodes)))


def train_instruction(cfg, fingerprint: str, rnd: int = 1) -> Message:
    model = build_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, rnd)
    plan.apply_to(model)
    config = ConfigRecord({**plan.to_config(), FINGERPRINT: fingerprint, SERVER_ROUND: rnd})
    content = RecordDict({ARRAYS: ArrayRecord(model.travelling_state()), CONFIG: config})
    return Message(content=content, dst_node_id=1, message_type="train")


def node_context() -> Context:
    return Context(run_id=1, node_id=1, node_config={PARTITION_ID: 2, NUM_PARTITIONS: 5}, state=RecordDict(),
                   run_config={})


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30, seed: int = 0) -> Path:
    """CIFAR-10's python version: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str, n: int) -> None:
        labels = (np.arange(n) % 10).tolist()
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, :1024] = np.array(labels, dtype=np.uint8)[:, None] * 25  # red channel encodes the class
        with (folder / name).open("wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f, protocol=2)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", test)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}, f, protocol=2)
    return root
