"""The ClientApp on a GPU: the same training messages handled with ``device = "cpu"`` and ``"cuda"``.

For each case (backbone x mode x privacy) one real Flower training message is handled by
fedtl's ClientApp handler on each device, from the same model, data and seeds. Checked:
the CUDA reply really came from the GPU (memory was allocated there), it holds the same
tensors (on the CPU, finite), and its update agrees with the CPU reply's up to float error
(within 5 %, relative; DP-SGD draws its noise and batches per device, so it is only run). Reported: time per round on
each device, and their ratio, measured side by side in this one process (float32 without TF32).

    python benchmarks/gpu_clients.py [--out results.json]

Without CUDA it runs the CPU side only and says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtl.clients.app import handle_evaluate, handle_train
from fedtl.config import ExperimentConfig, load_config
from fedtl.models.factory import build_model
from fedtl.models.modes import plan_round
from fedtl.models.transfer import TransferModel
from fedtl.protocol import ARRAYS, CONFIG, FINGERPRINT, SERVER_ROUND

CASES = {
    "small-cnn full": ["finetune.mode=full"],
    "small-cnn lora": ["finetune.mode=lora"],
    "small-cnn full dp-sgd": ["finetune.mode=full", "model.norm=group", "privacy.mode=dp-sgd",
                              "privacy.noise-multiplier=1.0"],
    # A calm step size: a diverging round would amplify float rounding into different updates.
    "resnet18 full 32px": ["model.backbone=resnet18", "init=scratch", "data.image-size=32", "finetune.mode=full",
                           "data.labelled-per-client=256", "finetune.lr=0.01"],
    "resnet18 lora 32px": ["model.backbone=resnet18", "init=scratch", "data.image-size=32", "finetune.mode=lora",
                           "data.labelled-per-client=256", "finetune.lr=0.01"],
}


def _message(cfg: ExperimentConfig, model: TransferModel, message_type: str) -> Message:
    plan = plan_round(cfg.finetune, model.block_names, 1)
    plan.apply_to(model)
    config = ConfigRecord({**plan.to_config(), FINGERPRINT: model.backbone_fingerprint, SERVER_ROUND: 1})
    return Message(RecordDict({ARRAYS: ArrayRecord(model.travelling_state()), CONFIG: config}), dst_node_id=1,
                   message_type=message_type)


def _round(cfg: ExperimentConfig, device: str) -> tuple[dict[str, torch.Tensor], float, float, float]:
    """One training round on ``device``: (the update, seconds, train loss, accuracy after evaluation)."""
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": cfg.clients,
                                                       "device": device}, state=RecordDict(), run_config={})
    model = build_model(cfg)
    initial = _message(cfg, model, "train").content["arrays"].to_torch_state_dict()
    if device == "cuda":  # the peak before this round, to see that the round itself allocated on the GPU
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
    start = time.perf_counter()
    reply = handle_train(_message(cfg, model, "train"), context, cfg)
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() > resting, "the round allocated nothing on the GPU"
    seconds = time.perf_counter() - start
    evaluation = handle_evaluate(_message(cfg, model, "evaluate"), context, cfg)
    metrics = reply.content["metrics"]
    update = {k: v - initial[k] for k, v in reply.content["arrays"].to_torch_state_dict().items()}
    return update, seconds, float(metrics["train-loss"]), float(evaluation.content["metrics"]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as Flower sets it in a ClientApp
    torch.set_num_threads(1)  # one CPU per client, as simulation.num-cpus = 1 gives it
    # Full float32 on the GPU (no TF32), so that the CPU and GPU updates can be compared closely.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    results = {}
    for name, sets in CASES.items():
        cfg = load_config(None, ["clients=4", "pretrain.epochs=2", "finetune.local-epochs=1", *sets])
        cpu_state, *_ = _round(cfg, "cpu")  # warm-up (pre-training, caches)
        cpu = [_round(cfg, "cpu") for _ in range(args.repeats)]
        row: dict[str, object] = {"cpu_seconds": min(r[1] for r in cpu), "cpu_loss": cpu[0][2], "cpu_accuracy": cpu[0][3]}
        if cuda:
            _round(cfg, "cuda")
            gpu = [_round(cfg, "cuda") for _ in range(args.repeats)]
            state = gpu[0][0]
            assert set(state) == set(cpu_state) and all(t.device.type == "cpu" and t.isfinite().all()
                                                        for t in state.values())
            dp = "dp-sgd" in name
            # cuDNN and the CPU round differently: compare the updates, relatively.
            diff = torch.sqrt(sum(((state[k] - cpu[0][0][k]).float() ** 2).sum() for k in state))
            norm = torch.sqrt(sum((cpu[0][0][k].float() ** 2).sum() for k in state))
            gap = float(diff / norm)
            row.update(gpu_seconds=min(r[1] for r in gpu), gpu_loss=gpu[0][2], gpu_accuracy=gpu[0][3],
                       relative_update_gap=gap, cpu_over_gpu=row["cpu_seconds"] / min(r[1] for r in gpu),
                       gpu_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
            if not dp:  # DP-SGD's noise and Poisson batches differ by device: only that it runs is checked
                assert gap < 0.05, f"{name}: the CUDA update differs from the CPU one by {gap:.3f} (relative)"
                assert abs(gpu[0][2] - cpu[0][2]) < 0.02, f"{name}: losses differ"
        results[name] = row
        print(name, json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
