"""Personalised strategies and adapters end to end on real Flower + Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtl.personalisation import run_model
from fedtl.reports.runs import read_metrics
from fedtl.simulations.simulate import simulate
from tests.helpers import make_config

pytestmark = pytest.mark.e2e


# FedRep's two phases are tested on real messages in tests/unit/test_personal.py; end to end it sends
# what FedPer sends.
@pytest.mark.parametrize("name", ["fedper", "fedbabu"])
def test_head_personalisations_federate_only_the_body(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    cfg = make_config("finetune.mode=full", f"strategy.personalisation={name}", "clients=3", "rounds=2",
                      "strategy.head-epochs=5", f"out={str(out)!r}")
    summary = simulate(cfg)
    rows = read_metrics(out)
    reference = run_model(cfg)
    body = sum(v.numel() for k, v in reference.state_dict().items() if k.startswith("blocks."))
    assert all(r["clients_ok"] == 3 and r["travelling_params"] == body for r in rows[1:])
    assert rows[1]["bytes_up"] >= 3 * 4 * body and summary["local_keys"] == (0 if name == "fedbabu" else 2)
    head = load_file(str(out / "checkpoints" / "last.safetensors"))
    for key in ("head.weight", "head.bias"):  # the server never received a head
        assert torch.equal(head[key], reference.state_dict()[key])
    per_client = summary["per_client"]
    # Each client's own head (trained locally, or tuned for FedBABU) beats the global model's untrained one.
    assert len(per_client["personal"]) == 3 and per_client["personal_mean"] > per_client["accuracy_mean"] + 0.1


def test_lora_under_fedadam_sends_adapters_and_head_only(tmp_path: Path) -> None:
    out = tmp_path / "lora"
    cfg = make_config("finetune.mode=lora", "finetune.adapter-blocks=2", "strategy.name=fedadam", "clients=3",
                      "rounds=2", f"out={str(out)!r}")
    summary = simulate(cfg)
    reference = run_model(cfg)
    assert summary["travelling_params"] == sum(v.numel() for k, v in reference.state_dict().items()
                                               if ".lora_" in k or k.startswith("head."))
    assert summary["travelling_ratio"] == pytest.approx(summary["travelling_bytes"] / summary["model_bytes"])
    assert summary["travelling_ratio"] < 0.25
    final = load_file(str(out / "checkpoints" / "last.safetensors"))
    for key, value in reference.state_dict().items():  # the pre-trained base is untouched
        if ".lora_" not in key and not key.startswith("head."):
            assert torch.equal(final[key], value), key


def test_fedbn_beats_fedavg_on_each_clients_own_images_under_domain_shift(tmp_path: Path) -> None:
    # The FedBN paper's direction: each silo sees its own acquisition style (rotation, blur,
    # low contrast, noise, shear); averaged BatchNorm statistics fit none of them, local ones
    # fit each. Measured on the BatchNorm variant of the built-in CNN, full fine-tuning.
    common = ("model.backbone=small-cnn-bn", "finetune.mode=full", "finetune.backbone-lr-scale=1.0",
              "finetune.local-epochs=5", "rounds=4", "data.client-test-fraction=0.5")
    fedavg = simulate(make_config(*common, f"out={str(tmp_path / 'fedavg')!r}"))["per_client"]
    fedbn = simulate(make_config(*common, "strategy.personalisation=fedbn",
                                 f"out={str(tmp_path / 'fedbn')!r}"))["per_client"]
    assert fedavg["personal_mean"] == fedavg["accuracy_mean"]  # nothing personal under FedAvg
    assert fedbn["personal_mean"] > fedavg["accuracy_mean"] + 0.05
    assert fedbn["personal_worst10"] > fedavg["accuracy_worst10"]
