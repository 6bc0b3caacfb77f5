"""The BatchNorm measurements of docs/concepts.md: fedtl's own pieces in a plain federated loop, outside Flower.

    .venv/bin/python docs/results/batchnorm/measure.py rounds=10 model.backbone=efficientnet-lite0 \
        data.image-size=96 finetune.mode=full [finetune.batchnorm=batch] [--scratch] [--batch-eval] [--no-recalibration]

``KEY=VALUE`` arguments are ``--set`` overrides of experiments/digits.toml (10 clients x 10 images in 5 styles).
Each round every client trains the global model with ``train_local`` on its own data, the server averages the
travelling tensors weighted by examples (FedAvg, as the ServerApp merges statistics too) and evaluates centrally in
eval mode. ``--scratch``: the run's from-scratch baseline (``as_scratch``). ``--batch-eval``: also the final
model's accuracy when BatchNorm normalises test batches of 64 by their own statistics (what the model computes in
training). ``--no-recalibration``: running statistics as momentum leaves them, not recalibrated at the end of each
local round (the behaviour before it). Prints the accuracy after every round, and the policy the config resolved.
"""

from __future__ import annotations

import sys

import torch

from fedtl.clients import trainer
from fedtl.config import load_config
from fedtl.data.federated import client_data, server_test_data
from fedtl.data.rows import LabelledImages
from fedtl.models.metrics import central_evaluate
from fedtl.models.modes import plan_round
from fedtl.models.transfer import BatchNormLayer, TransferModel
from fedtl.personalisation import run_model


def batch_statistics_accuracy(model: TransferModel, test: LabelledImages, batch: int = 64) -> float:
    """Accuracy with every BatchNorm normalising each test batch by its own statistics."""
    for m in model.modules():
        if isinstance(m, BatchNormLayer):
            m.train()
            m.momentum = 0.0  # normalise by the batch; leave the running statistics as they are
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), batch):
            idx = torch.arange(i, min(i + batch, len(test)))
            correct += int((model(test.batch(idx)).argmax(1) == test.y[idx]).sum())
    return correct / len(test)


def main(args: list[str]) -> None:
    flags = {a for a in args if a.startswith("--")}
    if "--no-recalibration" in flags:
        trainer.recalibrate_statistics = lambda model, passes: None  # passes never run
    torch.set_num_threads(2)
    cfg = load_config("experiments/digits.toml", [a for a in args if not a.startswith("--")])
    cfg = cfg.as_scratch() if "--scratch" in flags else cfg
    model = run_model(cfg)
    test = server_test_data(cfg.data)
    clients = [client_data(cfg.data, p, cfg.clients, cfg.seed) for p in range(cfg.clients)]
    print(f"finetune.batchnorm = {cfg.finetune.batchnorm!r}, init = {cfg.init!r}, mode = {cfg.finetune.mode!r}")
    for rnd in range(1, cfg.rounds + 1):
        plan = plan_round(cfg.finetune, model.block_names, rnd)
        plan.apply_to(model)
        sent = model.travelling_state()
        states, weights = [], []
        for p, data in enumerate(clients):
            model.load_travelling_state(sent)
            trainer.train_local(model, data, plan, cfg.finetune, seed=rnd * 1000 + p)
            states.append(model.travelling_state())
            weights.append(len(data))
        total = sum(weights)
        model.load_travelling_state({k: sum(w * s[k].double() for w, s in zip(weights, states)) / total for k in sent})
        print(f"round {rnd}: accuracy {central_evaluate(model, test)['accuracy']:.3f}", flush=True)
    if "--batch-eval" in flags:
        print(f"on batch statistics: {batch_statistics_accuracy(model, test):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
