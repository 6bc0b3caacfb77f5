"""Cross-device workloads for ``perf.py``: fedtl against the same federated maths as a plain sequential
PyTorch loop in one process, and against the same workload as a plain Flower app on Flower's own engine.

- ``sequential``: each round, the round's sampled clients train one after another on one model in this process
  (its tensors reset to the global model's before each client, fedtl's local round, the updates averaged by
  examples): no messages, no serialisation, no other process. Its per-client time is a client's compute.
- ``flower_app`` (run in a process of its own by ``perf.py``): a ServerApp and ClientApp written directly on
  Flower's Message API, Flower's ``FedAvg`` and ``run_simulation`` as they ship (Flower's Ray backend and
  engine, none of fedtl's), the same model, data, local round and Ray resources.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any


def workload_sets(images: Path, store: Path, clients: int, rounds: int, per_round: int = 50,
                  labelled: int = 1, local_epochs: int = 2, batch_size: int = 16) -> list[str]:
    """The ``--set`` values of a cross-device run: ``clients`` registered, ``per_round`` trained a round, each
    holding ``labelled`` of the generated 16-px images, ``small-cnn`` from scratch, full fine-tuning."""
    return ["data.scenario='image-folder'", f"data.path='{images}'", "data.image-size=16",
            f"data.labelled-per-client={labelled}", "data.client-test-fraction=0.0", "data.min-partition-size=1",
            "init='scratch'", "finetune.mode='full'", f"data.store-dir='{store}'", f"clients={clients}",
            f"strategy.fraction-train={per_round / clients}", f"rounds={rounds}",
            f"finetune.local-epochs={local_epochs}", f"finetune.batch-size={batch_size}"]


def _setup(sets: list[str]) -> tuple[Any, Any, Any]:
    import torch

    from fedtl.config import load_config
    from fedtl.models.modes import plan_round
    from fedtl.personalisation import run_model
    from fedtl.simulations.runtime import resolve_resources

    cfg = resolve_resources(load_config(None, sets))
    torch.set_num_threads(cfg.simulation.threads)  # what each of fedtl's client processes gets
    model = run_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, 1)  # full fine-tuning: the same plan every round
    plan.apply_to(model)
    return cfg, model, plan


def sequential(sets: list[str], per_round: int = 50) -> dict[str, Any]:
    """The run of ``sets`` as a sequential loop in this process (see the module); each round samples
    ``per_round`` clients at random. Returns the wall time, the per-client compute and the final accuracy."""
    import torch

    from fedtl.clients.trainer import train_local
    from fedtl.data.federated import client_data, server_test_data
    from fedtl.models.features import Feed
    from fedtl.models.metrics import evaluate_model

    t0 = time.perf_counter()
    cfg, model, plan = _setup(sets)
    feed, rng = Feed.of(cfg), random.Random(cfg.seed)
    data: dict[int, Any] = {}
    client_s: list[float] = []
    for rnd in range(1, cfg.rounds + 1):
        start = {k: v.clone() for k, v in model.travelling_state().items()}
        total: dict[str, torch.Tensor] = {}
        examples = 0
        for pid in rng.sample(range(cfg.clients), per_round):
            if pid not in data:  # read once, as a client process keeps its data
                data[pid] = client_data(cfg.data, pid, cfg.clients, cfg.seed)
            t = time.perf_counter()
            model.load_travelling_state(start)
            train_local(model, data[pid], plan, cfg.finetune, seed=rnd * 100_003 + pid, feed=feed)
            n = len(data[pid])
            for k, v in model.travelling_state().items():
                total[k] = total.get(k, 0) + v.detach().double() * n
            examples += n
            client_s.append(time.perf_counter() - t)
        model.load_travelling_state({k: (v / examples).to(start[k].dtype) for k, v in total.items()})
    accuracy = evaluate_model(model, server_test_data(cfg.data), feed)["accuracy"]
    client_s.sort()
    return {"wall_s": time.perf_counter() - t0, "client_median_s": client_s[len(client_s) // 2],
            "client_mean_s": sum(client_s) / len(client_s), "clients_trained": len(client_s),
            "final_accuracy": accuracy}


def flower_app(sets: list[str], out: Path) -> None:
    """The run of ``sets`` as a plain Flower app on Flower's own engine (see the module); writes each round's
    end time and the final accuracy to ``out/flower.jsonl``."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedtl.clients.trainer import train_local
    from fedtl.data.federated import client_data, server_test_data
    from fedtl.models.features import Feed
    from fedtl.models.metrics import evaluate_model
    from fedtl.protocol import PARTITION_ID

    out.mkdir(parents=True, exist_ok=True)
    log = out / "flower.jsonl"
    log.unlink(missing_ok=True)
    cfg, _, _ = _setup(sets)
    kept: dict[str, Any] = {}

    def model_and_plan() -> tuple[Any, Any]:
        if "model" not in kept:
            _, kept["model"], kept["plan"] = _setup(sets)
        return kept["model"], kept["plan"]

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model, plan = model_and_plan()
        model.load_travelling_state(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config[PARTITION_ID])
        if pid not in kept:  # read once per process, as fedtl's clients keep theirs
            kept[pid] = client_data(cfg.data, pid, cfg.clients, cfg.seed)
        data = kept[pid]
        rnd = int(msg.content["config"]["server-round"])
        train_local(model, data, plan, cfg.finetune, seed=rnd * 100_003 + pid, feed=Feed.of(cfg))
        content = RecordDict({"arrays": ArrayRecord({k: v.detach().clone() for k, v in
                                                     model.travelling_state().items()}),
                              "metrics": MetricRecord({"num-examples": len(data)})})
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            row: dict[str, Any] = {"round": rnd, "time": time.time()}
            if rnd == cfg.rounds:
                model, _ = model_and_plan()
                model.load_travelling_state(arrays.to_torch_state_dict())
                row["accuracy"] = evaluate_model(model, server_test_data(cfg.data), Feed.of(cfg))["accuracy"]
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            return MetricRecord({})

        model, _ = model_and_plan()
        initial = ArrayRecord({k: v.detach().clone() for k, v in model.travelling_state().items()})
        strategy = FedAvg(fraction_train=cfg.strategy.fraction_train, fraction_evaluate=0.0, min_train_nodes=2,
                          min_available_nodes=cfg.clients)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": 0.0}})
