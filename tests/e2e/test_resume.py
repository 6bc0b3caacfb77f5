"""Exact resume: a run killed mid-way and resumed from its checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtl.config import load_config
from fedtl.reports.runs import read_metrics
from fedtl.server.checkpoint import read_resume, resume_path
from fedtl.simulations.simulate import simulate
from tests.helpers import CACHE, ROOT, make_config

pytestmark = pytest.mark.e2e

# FedAdam's moments, client-level DP's accountant, adaptive clipping norm and noise (numpy's random state):
# what a resume must carry over, on 3 clients.
SETS = ("clients=3", "rounds=4", "strategy.name=fedadam", "privacy.mode=client-level", "privacy.clipping=adaptive",
        "noise-multiplier=0.1",
        "finetune.local-epochs=4", f"pretrain.cache-dir={str(CACHE)!r}", "pretrain.epochs=2")


def killed_after_round_2(out: Path) -> int:
    """Start the run in a process, SIGKILL it as soon as its checkpoint holds round 2; the round it holds."""
    proc = subprocess.Popen([sys.executable, "-m", "fedtl.cli", "simulate", *(a for s in SETS for a in ("--set", s)),
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before round 2 was checkpointed"
            if resume_path(out).is_file() and read_resume(out).round >= 2:
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


def test_a_run_killed_after_round_2_and_resumed_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    done = killed_after_round_2(killed)
    assert done < 4 and not (killed / "summary.json").exists()  # it was stopped mid-run
    summary = simulate(load_config(killed / "config.toml"), resume=True)
    assert summary["rounds"] == 4

    whole = tmp_path / "whole"
    simulate(make_config(*SETS, f"out={str(whole)!r}"))
    a, b = load_file(str(killed / "checkpoints" / "last.safetensors")), load_file(str(whole / "checkpoints" /
                                                                                     "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    timing = ("wall_seconds",)
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(killed)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(whole)]
    assert lines(killed / "privacy.jsonl") == lines(whole / "privacy.jsonl")
