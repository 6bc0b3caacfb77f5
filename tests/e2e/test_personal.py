"""Personalised strategies and adapters end to end on real Flower + Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtl.personalisation import run_model
from fedtl.reports.runs import read_metrics
from fedtl.simulations.simulate import simulate
from tests.helpers import lora_shares, make_config

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
    # Averaging A and B apart merges mean(B)·mean(A), not mean(B·A): the meter sees it in every adapted layer.
    # Small this early (5e-5, then 2e-4 here): every client's A starts from the same seeded tensor and B at
    # zero, so the As are still nearly one; it grows as they part. Well above float64 rounding either way.
    layers = {k.split(".lora_A.")[0] for k in reference.state_dict() if ".lora_A." in k}
    rows = read_metrics(out)
    assert all(set(r["lora_merge_error_layers"]) == layers and 1e-8 < r["lora_merge_error"] < 1 for r in rows[1:])
    assert rows[2]["lora_merge_error"] > rows[1]["lora_merge_error"] and (out / "lora_merge_error.png").is_file()


def test_fedbn_beats_fedavg_on_each_clients_own_images_under_domain_shift(tmp_path: Path) -> None:
    # The FedBN paper's direction: each silo sees its own acquisition style (rotation, blur,
    # low contrast, noise, shear); averaged BatchNorm statistics fit none of them, local ones
    # fit each. Measured on the BatchNorm variant of the built-in CNN, full fine-tuning; FedAvg with
    # its statistics averaged (finetune.batchnorm = "batch"), the comparison the paper makes.
    common = ("model.backbone=small-cnn-bn", "finetune.mode=full", "finetune.backbone-lr-scale=1.0",
              "finetune.local-epochs=5", "rounds=4", "data.client-test-fraction=0.5")
    fedavg = simulate(make_config(*common, "finetune.batchnorm=batch",
                                  f"out={str(tmp_path / 'fedavg')!r}"))["per_client"]
    fedbn = simulate(make_config(*common, "strategy.personalisation=fedbn",
                                 f"out={str(tmp_path / 'fedbn')!r}"))["per_client"]
    assert fedavg["personal_mean"] == fedavg["accuracy_mean"]  # nothing personal under FedAvg
    assert fedbn["personal_mean"] > fedavg["accuracy_mean"] + 0.05
    assert fedbn["personal_worst10"] > fedavg["accuracy_worst10"]


def test_fedsa_lora_federates_a_and_each_client_keeps_its_own_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 own_ray: None) -> None:
    # own_ray: the wiretap's client processes must start after $FEDTL_WIRETAP is set.
    from fedtl.protocol import LOCAL_STATE
    from fedtl.simulations.node_state import decode
    from tests.wiretap import ENV, wiretap

    out, tap = tmp_path / "fedsa", tmp_path / "wire.jsonl"
    monkeypatch.setenv(ENV, str(tap))
    cfg = make_config("finetune.mode=lora", "finetune.adapter-blocks=2", "strategy.personalisation=fedsa-lora",
                      "clients=3", "rounds=2", f"out={str(out)!r}")
    summary = simulate(cfg, mods=[wiretap])
    reference = run_model(cfg)
    b_keys = {k for k in reference.state_dict() if ".lora_B." in k}
    a_keys = {k for k in reference.state_dict() if ".lora_A." in k}
    assert b_keys and a_keys and summary["local_keys"] == len(b_keys)
    wire = [json.loads(line) for line in tap.read_text().splitlines()]
    assert len(wire) == 2 * 3 * 2  # down and up, three nodes, two rounds: every training message seen
    for m in wire:  # A and the head cross, in both directions; no B ever does
        assert a_keys <= set(m["keys"]) and not b_keys & set(m["keys"]), m
    final = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(final[k], reference.state_dict()[k]) for k in b_keys)  # the server's B: peft's zeros
    assert any(not torch.equal(final[k], reference.state_dict()[k]) for k in a_keys)  # A trained and merged
    # Each client kept its own trained B (its node state, what a resume restores), and they differ.
    own = [decode((out / "node-state" / f"partition-{p}" / "round-2.recorddict").read_bytes())
           .array_records[LOCAL_STATE].to_torch_state_dict() for p in range(3)]
    assert all(set(b) == b_keys and any(v.abs().sum() > 0 for v in b.values()) for b in own)
    assert not all(torch.equal(own[0][k], own[1][k]) for k in b_keys)
    assert len(summary["per_client"]["personal"]) == 3  # each client evaluated its personalised model
    assert all("lora_merge_error" not in r for r in read_metrics(out))  # B never seen: nothing to measure


def test_stacked_lora_folds_the_exact_mean_update_into_the_base_weights(tmp_path: Path) -> None:
    out = tmp_path / "stack"
    # Clients at ranks 2, 4, 2: stacking merges any ranks exactly.
    cfg = make_config("finetune.mode=lora", "finetune.adapter-blocks=2", "strategy.lora-merge=stack", "clients=3",
                      "finetune.lora-ranks=2,4", "rounds=2", f"out={str(out)!r}")
    summary = simulate(cfg)
    rows = read_metrics(out)
    reference = run_model(cfg).state_dict()
    base = {k for k in reference if k.endswith(".base_layer.weight")}
    bases = sum(reference[k].numel() * 4 for k in base)
    for r in rows[1:]:
        assert r["clients_ok"] == 3 and r["lora_merge_error"] < 1e-9  # exact, up to float64 rounding
        assert r["bytes_down"] >= r["bytes_up"] + 3 * bases  # the folded base weights go down, never up
    final = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert all(not torch.equal(final[k], reference[k]) for k in base)  # every adapted layer folded
    assert all(not final[k].any() for k in final if ".lora_B." in k)  # the next round's adapters: B at zero
    assert rows[2]["accuracy"] > rows[0]["accuracy"] and summary["final_accuracy"] == rows[2]["accuracy"]


def test_hetlora_trains_each_client_at_its_own_rank_and_sends_each_only_its_share(tmp_path: Path) -> None:
    out = tmp_path / "hetlora"
    cfg = make_config("finetune.mode=lora", "finetune.adapter-blocks=2", "strategy.lora-merge=hetlora",
                      "finetune.lora-rank=8", "finetune.lora-alpha=16", "finetune.lora-ranks=2,4,8", "clients=3",
                      "rounds=2", f"out={str(out)!r}")
    simulate(cfg)
    rows = read_metrics(out)
    # What ranks 2, 4 and 8 of the server's 8 hold: A's rows and B's columns cut, the head whole.
    shares = lora_shares(cfg, (2, 4, 8))
    assert shares < 0.8 * lora_shares(cfg, (8, 8, 8))  # 0.75 here: the head travels whole
    for r in rows[1:]:
        assert r["clients_ok"] == 3, r
        assert r["bytes_up"] == r["bytes_down"] == shares
        assert r["lora_merge_error"] > 0.05  # zero-padding then averaging: far from mean(B·A) (0.37, 0.17 here)
    assert rows[2]["accuracy"] > rows[0]["accuracy"]
