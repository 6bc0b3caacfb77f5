"""The ClientApp: one per SuperNode (simulated or real).

Each training message carries the round's plan and the travelling tensors; the
client rebuilds the same model from its local pre-trained weights, checks their
fingerprint against the server's, trains its own partition and replies only the
travelling tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtl.clients.trainer import train_local
from fedtl.config import ExperimentConfig
from fedtl.data.federated import client_data
from fedtl.models.factory import build_model
from fedtl.server.plan import RoundPlan

FINGERPRINT_KEY = "backbone-fingerprint"


class BackboneMismatchError(RuntimeError):
    """The client's pre-trained weights differ from the server's."""


def handle_train(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """Train this node's partition as the message's plan says; reply the travelling tensors."""
    torch.set_num_threads(1)  # one CPU per virtual client (SimulationConfig.num_cpus)
    config = msg.content["config"]
    model = build_model(cfg)
    theirs = config.get(FINGERPRINT_KEY)
    if theirs != model.backbone_fingerprint:
        raise BackboneMismatchError(
            f"backbone fingerprint mismatch: server {theirs}, this node {model.backbone_fingerprint}. "
            "Both must load the same pre-trained weights (same backbone, pretrain settings and weights file)."
        )
    plan = RoundPlan.from_config(config)
    model.set_trainable(plan.trainable_blocks)
    model.load_travelling_state(msg.content["arrays"].to_torch_state_dict())

    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = client_data(cfg.data, pid, n, cfg.seed)
    rnd = int(config["server-round"])
    result = train_local(model, data, plan, cfg.finetune, seed=cfg.seed * 1_000_003 + rnd * 1009 + pid)

    metrics = MetricRecord({"train-loss": result.loss, "num-examples": result.examples, "steps": result.steps})
    content = RecordDict({"arrays": ArrayRecord(model.travelling_state()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp for ``run_config`` (a flattened ExperimentConfig).

    ``None`` reads it from the run's Context, as under ``flwr run``; ``fedtl simulate``
    passes it here because Flower's ``run_simulation`` carries no run config.
    """
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = ExperimentConfig.from_run_config(run_config if run_config is not None else context.run_config)
        return handle_train(msg, context, cfg)

    return client


app = make_client_app()
