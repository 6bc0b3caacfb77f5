"""Exact resume: a run killed mid-way and resumed from its checkpoint ends where an uninterrupted run ends
(under client-level DP, whose noise is fresh entropy, its accountant carries on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtl.accounting import client_level_epsilon, sample_epsilon
from fedtl.config import load_config
from fedtl.reports.runs import read_metrics
from fedtl.server.checkpoint import read_resume, resume_path
from fedtl.simulations.simulate import simulate
from tests.helpers import CACHE, ROOT, make_config

pytestmark = pytest.mark.e2e

# Client-level DP's accountant and adaptive clipping norm: what a resume must carry over, on 3 clients.
SETS = ("clients=3", "rounds=4", "privacy.mode=client-level", "privacy.clipping=adaptive",
        "noise-multiplier=0.1",
        "finetune.local-epochs=2", f"pretrain.cache-dir={str(CACHE)!r}", "pretrain.epochs=2")


# Node state, which comes back from node-state/: FedPer's local heads (and FedAdam's moments, on the server) ...
FEDPER = ("clients=3", "rounds=4", "strategy.personalisation=fedper", "finetune.mode=full", "strategy.name=fedadam",
          f"pretrain.cache-dir={str(CACHE)!r}", "pretrain.epochs=2")
# ... and DP-SGD's per-client accountants: 20 images in batches of 4, 5 steps an epoch, 2 epochs a round.
DP_SGD = ("clients=3", "rounds=4", "privacy.mode=dp-sgd", "labelled-per-client=20", "finetune.batch-size=4",
          "local-epochs=2", f"pretrain.cache-dir={str(CACHE)!r}", "pretrain.epochs=2")
ROUND_STEPS = 10


def checkpointed_round_2(out: Path) -> bool:
    return resume_path(out).is_file() and read_resume(out).round >= 2


def a_node_ran_round_3(out: Path) -> bool:
    return any((out / "node-state").glob("*/round-3.recorddict"))


def killed_after_round_2(out: Path, sets: tuple[str, ...] = SETS, when: Callable[[Path], bool] = checkpointed_round_2) -> int:
    """Start the run in a process, SIGKILL it as soon as ``when`` (by default: its checkpoint holds round 2);
    the round its checkpoint holds."""
    proc = subprocess.Popen([sys.executable, "-m", "fedtl.cli", "simulate", *(a for s in sets for a in ("--set", s)),
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before round 2 was checkpointed"
            if when(out):
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    return read_resume(out).round


def lines(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in path.read_text().splitlines()]


def test_a_client_level_dp_run_killed_after_round_2_continues_its_accountant(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    done = killed_after_round_2(killed)
    assert done < 4 and not (killed / "summary.json").exists()  # it was stopped mid-run
    # The state the noise is drawn from is never written (fresh entropy: tests/unit/test_client_dp.py).
    assert read_resume(killed).numpy_random is None
    summary = simulate(load_config(killed / "config.toml"), resume=True)
    assert summary["rounds"] == 4 and [r["round"] for r in read_metrics(killed)] == [0, 1, 2, 3, 4]
    # The accountant carried on: one release a round at sigma 0.1, as an uninterrupted run's.
    rows = lines(killed / "privacy.jsonl")
    assert [(r["round"], r["client"], r["releases"], r["noise_multiplier"]) for r in rows] == [
        (n, "all", n, 0.1) for n in range(1, 5)]
    assert [r["epsilon"] for r in rows] == pytest.approx(
        [client_level_epsilon(0.1, releases=n, sampled=3, population=3, delta=1e-5) for n in range(1, 5)])


def test_a_resumed_run_gets_back_its_nodes_local_heads(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    assert killed_after_round_2(killed, FEDPER) < 4 and not (killed / "summary.json").exists()
    simulate(load_config(killed / "config.toml"), resume=True)

    whole = tmp_path / "whole"
    simulate(make_config(*FEDPER, f"out={str(whole)!r}"))
    a, b = (load_file(str(run / "checkpoints" / "last.safetensors")) for run in (killed, whole))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # Every round's training loss (each node's own head under the shared body), and each node's
    # personalised accuracy at the end, are the uninterrupted run's: the heads came back as they were.
    timing = ("wall_seconds",)
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(killed)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(whole)]
    per_client = [json.loads((run / "summary.json").read_text())["per_client"] for run in (killed, whole)]
    assert per_client[0] == per_client[1] and per_client[0]["personal_mean"] > per_client[0]["accuracy_mean"]


def test_a_resumed_dp_sgd_run_counts_every_step_its_nodes_took_lost_rounds_included(tmp_path: Path) -> None:
    # DP-SGD's noise is fresh randomness (os.urandom), so a round that runs again is a second release:
    # its lost first run stays spent. (No uninterrupted run to compare with: the noise differs by design.)
    killed = tmp_path / "killed"
    done = killed_after_round_2(killed, DP_SGD, when=a_node_ran_round_3)  # killed mid-round 3
    assert done < 4 and not (killed / "summary.json").exists()
    lost = {p.name.removeprefix("partition-"): sum(int(f.stem.removeprefix("round-")) > done for f in p.iterdir())
            for p in (killed / "node-state").iterdir()}  # the rounds past the checkpoint each node had run
    assert set(lost) == {"0", "1", "2"} and any(lost.values())
    simulate(load_config(killed / "config.toml"), resume=True)

    rows = lines(killed / "privacy.jsonl")
    assert sorted((r["round"], r["client"]) for r in rows) == [(n, c) for n in range(1, 5) for c in "012"]
    for row in rows:
        steps = ROUND_STEPS * (row["round"] + (lost[row["client"]] if row["round"] > done else 0))
        assert row["steps"] == steps, row
        assert row["epsilon"] == pytest.approx(sample_epsilon([(1.0, 0.2, steps)], accountant="rdp", delta=1e-5))




def test_a_resumed_10000_client_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    # Nodes are asked what they hold when first sampled, held-out ones are replaced, the final evaluation is a
    # sample, and Flower's simulation gives its nodes new random ids in every process: the seed must still decide
    # who trains and who evaluates (before: a set's order, and the nodes registered by the time round 1 began).
    # The resumed run knows none of the answers the killed one had, and its first round starts the actors (Ray
    # draws from Python's random as they start): it must still train the same nodes and end the same.
    from tests.helpers import run_fedtl, write_cifar10

    root = write_cifar10(tmp_path / "data", per_batch=2000, test=100)  # 10,000 training images, one a client
    sets = ("data.scenario=torchvision", "data.dataset=CIFAR10", f"data.root={str(root)!r}",
            "data.verify-checksums=false", "data.image-size=8", "data.labelled-per-client=1",
            "data.client-test-fraction=0.0", "data.min-partition-size=1", "clients=10000",
            "data.held-out-clients=2000", "strategy.fraction-train=0.0025", "strategy.evaluate-clients=30",
            "rounds=4", "init=scratch", "finetune.mode=full", f"data.store-dir={str(tmp_path / 'store')!r}")
    killed, whole = tmp_path / "killed", tmp_path / "whole"  # each in a process of its own, as a user runs them
    assert killed_after_round_2(killed, sets) < 4 and not (killed / "summary.json").exists()
    assert run_fedtl("simulate", "--resume", str(killed)).returncode == 0
    assert run_fedtl("simulate", *(a for s in sets for a in ("--set", s)), "--out", str(whole)).returncode == 0

    rows = [[{k: v for k, v in r.items() if k != "wall_seconds"} for r in read_metrics(out)] for out in (killed, whole)]
    assert rows[0] == rows[1] and all(r["clients_ok"] == 20 for r in rows[0][1:])  # 0.25 % of the 8,000 that train
    a, b = (load_file(str(run / "checkpoints" / "last.safetensors")) for run in (killed, whole))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    evaluated = [lines(out / "clients.jsonl", ("node-id",)) for out in (killed, whole)]
    assert evaluated[0] == evaluated[1] and len(evaluated[0]) == 30  # the same seeded sample of 10,000
    assert json.loads((whole / "summary.json").read_text())["final_evaluation"] == {"asked": 30, "nodes": 10000}
