"""fedtl's costs measured side by side in one run: ratios, saved as JSON, a Markdown table and a plot.

    make bench-perf                       # every section (about 20 minutes on 2 cores)
    .venv/bin/python benchmarks/perf.py --only cache dp

Sections (``--only``):

- ``bare``: fedtl's default study against a bare Flower ServerApp/ClientApp written here on the
  Message API (FedAvg of the head, same data, weights, rounds, clients and Ray resources).
- ``cache``: feature extraction at 224 px (a generated image folder: 10 clients x 200 images and a
  400-image test set, ``mobilenet_v3_small`` from a weights file, 3 local epochs, 10 rounds) with
  the feature cache on and off; the floor measured in the same run (one backbone forward over
  every image, the head's training on those features, and a bare Flower run of an empty model);
  the same federated maths as a sequential loop in one process; peak memory summed over all the
  run's processes (resident and proportional set size, sampled every second with psutil).
- ``study``: a 6-run study's per-run fixed cost (wall time minus rounds x the median round) with
  one Ray instance and actor pool for the study against Ray and actors started per run.
- ``dp``: DP-SGD against plain SGD for one client round, head-only and LoRA, on cached features.
- ``scale``: 100 and 1,000 virtual clients, fraction 0.1, 5 rounds: seconds per round and memory.
- ``population``: 100, 1,000, 10,000 and 100,000 registered clients, 50 trained a round, 5 rounds: the fixed
  cost (wall time outside the rounds), the median round and peak memory, the largest against the smallest;
  a trained client's cost above its compute (a median round / 50, less a client's time in the sequential loop
  of ``federation.py`` on the same workload).
- ``pfl``: pfl-research's cross-device shape (1,000 clients, 50 a round, 200 rounds): fedtl against the same
  maths as a sequential loop in one process and against a plain Flower app on Flower's own engine.

Writes ``benchmarks/results/perf.{json,md,png}`` (``--out`` to change). No number here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".tmp" / "bench-perf"
FEDTL = [sys.executable, "-m", "fedtl.cli"]


# -- measuring ----------------------------------------------------------------------------------
class PeakMemory:
    """Peak of the summed RSS and PSS of a process and all its descendants, sampled every ``every`` s."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        self.pid, self.every = pid, every
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.every)


def timed_command(cmd: list[str], *, memory: bool = False) -> dict[str, float]:
    """Wall seconds of ``cmd`` (and the peak memory of its process tree)."""
    env = {**os.environ, "COLUMNS": "120"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(proc.pid) if memory else nullcontext() as peak:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    res = {"wall_s": wall}
    if memory:
        res |= {"peak_rss_gb": peak.rss / 2**30, "peak_pss_gb": peak.pss / 2**30}
    return res


def rounds_of(run: Path) -> list[float]:
    """Seconds each round took (from the run's metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_seconds"] for r in rows]
    return [b - a for a, b in zip(walls, walls[1:], strict=False)]


def final_accuracy(run: Path) -> float:
    return float(json.loads((run / "summary.json").read_text())["final_accuracy"])


# -- the bare Flower app ------------------------------------------------------------------------
def bare_app(config: str, sets: list[str], out: Path, empty: bool = False) -> None:
    """A Flower app written directly on the Message API: FedAvg of the head, as fedtl's feature extraction.

    It reuses fedtl only for what is not Flower: the config, the data and the pre-trained model.
    ``empty``: a model of one tensor and no training, Flower's own per-round cost.
    """
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedtl.config import load_config
    from fedtl.data.federated import client_data, server_test_data
    from fedtl.models.features import forward_batch
    from fedtl.models.pretrain import ensure_pretrained, pretrains_itself
    from fedtl.personalisation import run_model
    from fedtl.protocol import PARTITION_ID
    from fedtl.simulations.runtime import resolve_resources

    cfg = resolve_resources(load_config(config, sets))
    out.mkdir(parents=True, exist_ok=True)
    if pretrains_itself(cfg):
        ensure_pretrained(cfg)
    models: dict[str, Any] = {}

    def model() -> Any:
        if "m" not in models:
            models["m"] = run_model(cfg)
        return models["m"]

    def head_state() -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(1)} if empty else {k: v.clone() for k, v in model().head.state_dict().items()}

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(cfg.simulation.threads)
        state = msg.content["arrays"].to_torch_state_dict()
        n = 1
        if not empty:
            m = model()
            m.head.load_state_dict(state)
            pid = int(context.node_config[PARTITION_ID])
            data = client_data(cfg.data, pid, cfg.clients, cfg.seed)
            with torch.no_grad():
                m.eval()
                feats = torch.cat([torch.nn.Sequential(*m.blocks.values())(data.batch(p))
                                   for p in torch.arange(len(data)).split(forward_batch(data))])
            opt = torch.optim.SGD(m.head.parameters(), lr=cfg.finetune.lr, momentum=cfg.finetune.momentum)
            g = torch.Generator().manual_seed(int(context.node_id) % 2**31)
            for _ in range(cfg.finetune.local_epochs):
                for idx in torch.randperm(len(data), generator=g).split(cfg.finetune.batch_size):
                    opt.zero_grad()
                    F.cross_entropy(m.head(feats[idx]), data.y[idx]).backward()
                    opt.step()
            state, n = m.head.state_dict(), len(data)
        content = RecordDict({"arrays": ArrayRecord({k: v.detach() for k, v in state.items()}),
                              "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        test = server_test_data(cfg.data)

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            if empty:
                return MetricRecord({})
            m = model()
            m.head.load_state_dict(arrays.to_torch_state_dict())
            m.eval()
            with torch.no_grad():
                logits = torch.cat([m(test.batch(p)) for p in torch.arange(len(test)).split(forward_batch(test))])
            acc = float((logits.argmax(1) == test.y).float().mean())
            with (out / "bare.jsonl").open("a") as f:
                f.write(json.dumps({"round": rnd, "accuracy": acc, "time": time.time()}) + "\n")
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(fraction_train=cfg.strategy.fraction_train, fraction_evaluate=0.0,
                          min_train_nodes=cfg.strategy.min_train_nodes,
                          min_available_nodes=cfg.strategy.min_available_nodes)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(head_state()), num_rounds=cfg.rounds,
                       evaluate_fn=evaluate)

    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": 0.0}})


# -- sections -----------------------------------------------------------------------------------
def section_bare(res: dict[str, Any]) -> None:
    sets = ["rounds=20"]
    out = WORK / "bare"
    out.mkdir(parents=True, exist_ok=True)
    runs = {"bare": [], "fedtl": []}
    for _ in range(1):  # one each, back to back, so both see the same machine
        (out / "bare.jsonl").unlink(missing_ok=True)
        runs["bare"].append(timed_command([sys.executable, __file__, "_bare", "experiments/digits.toml", str(out),
                                           *sets])["wall_s"])
        runs["fedtl"].append(timed_command([*FEDTL, "simulate", "--config", "experiments/digits.toml", "--out",
                                            str(out / "fedtl"), "--overwrite", *[a for s in sets for a in ("--set", s)]])
                             ["wall_s"])
    bare_acc = json.loads((out / "bare.jsonl").read_text().splitlines()[-1])["accuracy"]
    b, f = statistics.median(runs["bare"]), statistics.median(runs["fedtl"])
    res["bare"] = {"workload": "experiments/digits.toml, 20 rounds, 10 clients, feature extraction",
                   "bare_wall_s": runs["bare"], "fedtl_wall_s": runs["fedtl"], "ratio_fedtl_over_bare": f / b,
                   "bare_final_accuracy": bare_acc, "fedtl_final_accuracy": final_accuracy(out / "fedtl")}


def make_images(root: Path, clients: int = 10, per_client: int = 200, test: int = 400, size: int = 224) -> Path:
    """A class-per-subfolder JPEG folder (train/ and test/), 10 classes told apart by colour and stripes."""
    from PIL import Image

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", clients * per_client), ("test", test)):
        for i in range(n):
            c = i % 10
            hue = np.array([(c * 37) % 256, (c * 91) % 256, (c * 151) % 256], dtype=np.float32)
            stripes = (np.sin((xx * (c + 1) + yy * (10 - c)) / 9.0) > 0)[..., None] * 60.0
            img = np.clip(hue * 0.6 + stripes + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def cache_sets(images: Path, weights: Path, cache: str) -> list[str]:
    return ["data.scenario='image-folder'", f"data.path='{images}'", "data.image-size=224", "clients=10",
            "data.labelled-per-client=200", "data.client-test-fraction=0.0", "model.backbone='mobilenet_v3_small'",
            f"model.weights-path='{weights}'", "finetune.mode='feature-extraction'", "finetune.local-epochs=3",
            "finetune.batch-size=32", "rounds=10", f"finetune.feature-cache='{cache}'", "name='bench-224'",
            f"data.store-dir='{WORK / 'store'}'"]


def calibrated_network(images: Path) -> dict[str, Any]:
    """No ImageNet weights offline: a fixed random ``mobilenet_v3_small`` whose BatchNorm statistics are set
    from 256 of the images (else its frozen features are near-constant), as a weights file holds them."""
    import torch
    import torchvision
    from PIL import Image

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batches
    files = sorted((images / "train").rglob("*.jpg"))[::8][:256]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255).permute(2, 0, 1)
                     for f in files])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.train()
    with torch.no_grad():
        for xb in ((x - mean) / std).split(64):
            net(xb)
    return net.state_dict()


def section_cache(res: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    images = make_images(WORK / "images224")
    weights = WORK / "mobilenet_v3_small.safetensors"
    if not weights.exists():
        save_file(calibrated_network(images), str(weights))
    # The cached run pays its one forward pass per image: no features from an earlier benchmark.
    shutil.rmtree(WORK / "store" / "features", ignore_errors=True)
    runs = {}
    for cache in ("auto", "off"):
        sets = cache_sets(images, weights, cache)
        out = WORK / f"cache-{cache}"
        m = timed_command([*FEDTL, "simulate", "--out", str(out), "--overwrite",
                           *[a for s in sets for a in ("--set", s)]], memory=True)
        runs[cache] = {**m, "final_accuracy": final_accuracy(out), "round_s": rounds_of(out)}
    # The same processes without fedtl: the bare Flower app on this workload (no cache, so 3 rounds), for the
    # memory that torch, Flower and Ray take before any of fedtl's data.
    bare = timed_command([sys.executable, __file__, "_bare", "", str(WORK / "bare-224"),
                          *cache_sets(images, weights, "off"), "rounds=3"], memory=True)
    pool_bytes = (10 * 200 + 400) * 3 * 224 * 224
    floor = measure_floor(images, weights)
    seq = sequential_loop(images, weights)
    on, off = runs["auto"], runs["off"]
    res["cache"] = {
        "workload": "224 px image folder, 10 clients x 200 + 400 test images, mobilenet_v3_small from a weights file, "
                    "feature extraction, 3 local epochs, 10 rounds",
        "on": on, "off": off, "speedup_off_over_on": off["wall_s"] / on["wall_s"],
        "accuracy_points_on_minus_off": 100 * (on["final_accuracy"] - off["final_accuracy"]),
        "floor": floor, "ratio_fedtl_over_floor": on["wall_s"] / floor["total_s"],
        # Where the cached run's time goes beyond the floor (its rounds' ends are measured from the ServerApp's start)
        "on_parts_s": {"outside the rounds (imports, Ray's start, round 0's evaluation, teardown)": on["wall_s"] - sum(on["round_s"]),
                       "round 1 (the actors' start, one forward pass per image)": on["round_s"][0],
                       "rounds 2 to 9": sum(on["round_s"][1:-1]),
                       "round 10 (with the clients' final evaluation)": on["round_s"][-1]},
        "sequential": seq, "ratio_fedtl_over_sequential": on["wall_s"] / seq["wall_s"],
        "pool_uint8_gb": pool_bytes / 2**30,
        "peak_pss_minus_pool_gb": on["peak_pss_gb"] - pool_bytes / 2**30,
        "bare_flower_3_rounds": bare, "peak_pss_over_bare_gb": on["peak_pss_gb"] - bare["peak_pss_gb"],
    }


def _in_process(images: Path, weights: Path) -> tuple[Any, Any, list[Any], Any]:
    import torch

    from fedtl.config import load_config
    from fedtl.data.federated import client_data, server_test_data
    from fedtl.personalisation import run_model

    cfg = load_config(None, cache_sets(images, weights, "off"))
    torch.set_num_threads(2)
    model = run_model(cfg)
    clients = [client_data(cfg.data, i, cfg.clients, cfg.seed) for i in range(cfg.clients)]
    return cfg, model, clients, server_test_data(cfg.data)


def measure_floor(images: Path, weights: Path) -> dict[str, float]:
    """The compute floor: one backbone forward over every image + the head's training on those features; and, shown
    beside it, a bare Flower run of an empty model (Flower's own cost on this shape of run)."""
    import torch
    import torch.nn.functional as F

    cfg, model, clients, test = _in_process(images, weights)
    model.eval()
    body = torch.nn.Sequential(*model.blocks.values())
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = [torch.cat([body(d.batch(p)) for p in torch.arange(len(d)).split(64)]) for d in [*clients, test]]
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(cfg.rounds):
        for f, d in zip(feats[:-1], clients, strict=True):
            head = torch.nn.Linear(f.shape[1], 10)
            opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
            for _ in range(cfg.finetune.local_epochs):
                for idx in torch.randperm(len(d)).split(cfg.finetune.batch_size):
                    opt.zero_grad()
                    F.cross_entropy(head(f[idx]), d.y[idx]).backward()
                    opt.step()
    head_s = time.perf_counter() - t0
    empty = WORK / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    flower = timed_command([sys.executable, __file__, "_bare_empty", "", str(empty), "rounds=10", "clients=10"])
    # The floor is the compute alone; Flower's cost with an empty model is shown beside it, not counted in it.
    return {"forward_all_s": forward, "head_training_s": head_s, "flower_empty_model_s": flower["wall_s"],
            "total_s": forward + head_s}


def sequential_loop(images: Path, weights: Path) -> dict[str, float]:
    """The same federated maths in one process: each round every client trains fedtl's local round on the
    cached features, and the heads are averaged by examples."""
    import copy

    import torch

    from fedtl.clients.trainer import train_local
    from fedtl.models.features import Feed
    from fedtl.models.modes import plan_round

    t0 = time.perf_counter()
    cfg, model, clients, test = _in_process(images, weights)
    feed = Feed(cache_dir=str(WORK / "store" / "features"))
    plan = plan_round(cfg.finetune, model.block_names, 1)
    plan.apply_to(model)
    for rnd in range(cfg.rounds):
        states, sizes = [], []
        for i, d in enumerate(clients):
            m = copy.deepcopy(model)
            train_local(m, d, plan, cfg.finetune, seed=rnd * 100 + i, feed=feed)
            states.append(m.travelling_state())
            sizes.append(len(d))
        w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
        model.load_travelling_state({k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)) for k in states[0]})
    from fedtl.models.metrics import evaluate_model

    acc = evaluate_model(model, test, feed)["accuracy"]
    return {"wall_s": time.perf_counter() - t0, "final_accuracy": acc}


def section_study(res: dict[str, Any]) -> None:
    import fedtl.simulations.study as study_mod
    from fedtl.simulations.study import load_study, run_study

    spec_file = WORK / "six.toml"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(f'[study]\nname = "six"\nbase = "{ROOT / "experiments" / "digits.toml"}"\nseeds = [0, 1, 2]\n'
                         'scratch = false\n[study.set]\nrounds = 5\n[study.grid]\n'
                         '"finetune.mode" = ["feature-extraction", "bias-only"]\n')
    out = {}
    for name, warm in (("per-run start-up (before)", False), ("one runtime per study (after)", True)):
        folder = WORK / f"study-{'warm' if warm else 'cold'}"
        original = study_mod.kept_warm
        if not warm:
            study_mod.kept_warm = nullcontext  # what every run paid before: Ray and its actors started per run
        try:
            from rich.console import Console
            t0 = time.perf_counter()
            plan = run_study(load_study(spec_file), folder, overwrite=True, console=Console(quiet=True),
                             command="benchmarks/perf.py --only study")
            wall = time.perf_counter() - t0
        finally:
            study_mod.kept_warm = original
        fixed = []
        for run in plan:
            rounds = rounds_of(Path(run.cfg.out))
            fixed.append(json.loads((Path(run.cfg.out) / "summary.json").read_text())["wall_seconds"]
                         - len(rounds) * statistics.median(rounds))
        out[name] = {"wall_s": wall, "per_run_fixed_s": statistics.mean(fixed), "runs": len(plan)}
    before, after = out["per-run start-up (before)"], out["one runtime per study (after)"]
    res["study"] = {**out, "ratio_fixed_after_over_before": after["per_run_fixed_s"] / before["per_run_fixed_s"],
                    "note": "fixed cost = a run's wall seconds (from round 0) minus rounds x its median round"}


def section_dp(res: dict[str, Any]) -> None:
    import copy

    import torch

    from fedtl.clients.dp_sgd import train_private
    from fedtl.clients.spend import initial_state
    from fedtl.clients.trainer import train_local
    from fedtl.config import load_config
    from fedtl.models.features import Feed
    from fedtl.models.modes import plan_round
    from fedtl.personalisation import run_model

    images = make_images(WORK / "images224")
    weights = WORK / "mobilenet_v3_small.safetensors"
    out = {}
    for mode in ("feature-extraction", "lora"):
        sets = [*cache_sets(images, weights, "auto"), f"finetune.mode='{mode}'", "finetune.adapter-blocks=1"]
        cfg = load_config(None, sets)
        dp_cfg = load_config(None, [*sets, "privacy.mode='dp-sgd'", "privacy.noise-multiplier=1.0"])
        torch.set_num_threads(2)
        from fedtl.data.federated import client_data

        data = client_data(cfg.data, 0, cfg.clients, cfg.seed)
        base = run_model(cfg)
        plan = plan_round(cfg.finetune, base.block_names, 1)
        feed = Feed.of(cfg)
        times: dict[str, list[float]] = {"sgd": [], "dp-sgd": []}
        for rep in range(4):  # the first builds the cache; alternate, keep the last three
            for name in ("sgd", "dp-sgd"):
                m = copy.deepcopy(base)
                plan.apply_to(m)
                t0 = time.perf_counter()
                if name == "sgd":
                    train_local(m, data, plan, cfg.finetune, seed=rep, feed=feed)
                else:
                    state = initial_state(dp_cfg.privacy, dp_cfg.finetune, dp_cfg.rounds, len(data))
                    train_private(m, data, plan, dp_cfg.finetune, dp_cfg.privacy, state, feed=feed)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        s, d = statistics.median(times["sgd"]), statistics.median(times["dp-sgd"])
        out[mode] = {"sgd_s": s, "dp_sgd_s": d, "ratio_dp_over_sgd": d / s}
    # End to end, as a user meets it: the 224-px run of the cache section, head only, without and with DP-SGD.
    runs = {}
    for name, extra in (("sgd", []), ("dp-sgd", ["privacy.mode='dp-sgd'", "privacy.noise-multiplier=1.0"])):
        run = WORK / f"dp-run-{name}"
        runs[name] = timed_command([*FEDTL, "simulate", "--out", str(run), "--overwrite",
                                    *[a for s in [*cache_sets(images, weights, "auto"), *extra] for a in ("--set", s)]])
        runs[name]["final_accuracy"] = final_accuracy(run)
    out["run"] = {**runs, "ratio_dp_over_sgd": runs["dp-sgd"]["wall_s"] / runs["sgd"]["wall_s"]}
    res["dp"] = {"workload": "local training of one client round (200 images at 224 px, 3 epochs, batch 32), "
                             "mobilenet_v3_small, cached features, lora on the top block; and the whole 224-px run of "
                             "the cache section (10 clients, 10 rounds, head only) with and without DP-SGD", **out}


def section_scale(res: dict[str, Any]) -> None:
    out = {}
    images = make_images(WORK / "images224")
    for clients in (100, 1000):
        run = WORK / f"scale-{clients}"
        # The generated folder's 2,000 training images at 16 px: two per client at 1,000 clients.
        sets = ["data.scenario='image-folder'", f"data.path='{images}'", "data.image-size=16", f"clients={clients}",
                "strategy.fraction-train=0.1", "rounds=5", "data.labelled-per-client=0", "data.client-test-fraction=0.0",
                "data.min-partition-size=1", "init='scratch'", "finetune.mode='full'", f"data.store-dir='{WORK / 'store'}'"]
        m = timed_command([*FEDTL, "simulate", "--out", str(run), "--overwrite",
                           *[a for s in sets for a in ("--set", s)]], memory=True)
        rounds = rounds_of(run)
        out[str(clients)] = {**m, "median_round_s": statistics.median(rounds[1:] or rounds)}
    res["scale"] = {"workload": "2,000 generated images at 16 px, small-cnn from scratch, full fine-tuning, "
                                "fraction-train 0.1, 5 rounds", **out}


POPULATIONS = (100, 1_000, 10_000, 100_000)


def section_population(res: dict[str, Any]) -> None:
    """100 -> 100,000 registered clients, 50 trained a round, 5 rounds, one image each: what grows with the
    population (the fixed cost: wall time outside the rounds; peak memory) and what must not (a round); and a
    trained client's cost above its compute (the sequential loop's per-client time on the same workload)."""
    from federation import sequential, workload_sets

    images = make_images(WORK / "images16-100k", clients=500, per_client=200, size=16)  # 100,000 + 400 test
    store = WORK / "store"

    def run(clients: int, rounds: int, out: Path, memory: bool) -> dict[str, Any]:
        sets = workload_sets(images, store, clients, rounds)
        return timed_command([*FEDTL, "simulate", "--out", str(out), "--overwrite",
                              *[a for s in sets for a in ("--set", s)]], memory=memory)

    run(100, 1, WORK / "population-warm-up", memory=False)  # the store's decode of 100,400 images, once
    out: dict[str, Any] = {}
    for clients in POPULATIONS:
        folder = WORK / f"population-{clients}"
        m = run(clients, 5, folder, memory=True)
        rounds = rounds_of(folder)
        summary = json.loads((folder / "summary.json").read_text())
        out[str(clients)] = {**m, "round_s": rounds, "median_round_s": statistics.median(rounds),
                             "fixed_s": m["wall_s"] - sum(rounds), "final_evaluation": summary.get("final_evaluation")}
    loop = sequential(workload_sets(images, store, 1_000, 20))  # 1,000 client rounds: the compute of one
    small, large = out[str(POPULATIONS[0])], out[str(POPULATIONS[-1])]
    res["population"] = {
        "workload": "100,000 generated 16-px images (one a client), small-cnn from scratch, full fine-tuning, 50 "
                    "clients trained a round, 5 rounds, store decoded before the first measured run",
        **out,
        "sequential": loop,
        "overhead_per_client_ms": {n: 1000 * (q["median_round_s"] / 50 - loop["client_mean_s"]) for n, q in out.items()},
        "fixed_ratio": large["fixed_s"] / small["fixed_s"],
        "round_ratio": large["median_round_s"] / small["median_round_s"],
        "memory_growth_gb": large["peak_pss_gb"] - small["peak_pss_gb"],
    }


def section_pfl(res: dict[str, Any]) -> None:
    """pfl-research's cross-device CIFAR-10 shape (1,000 clients, 50 a round, 1 local epoch in batches of 10, 50
    images a client) for 200 rounds: fedtl against a sequential loop of the same maths in one process and
    against a plain Flower app on Flower's own engine (``federation.py``)."""
    from federation import sequential, workload_sets

    images = make_images(WORK / "images16-100k", clients=500, per_client=200, size=16)
    sets = workload_sets(images, WORK / "store", 1_000, 200, labelled=50, local_epochs=1, batch_size=10)
    fedtl_run, flower_run = WORK / "pfl-fedtl", WORK / "pfl-flower"
    # fedtl's clients' final evaluation (a feature the others lack) kept to 50 clients, a round's worth
    fedtl = timed_command([*FEDTL, "simulate", "--out", str(fedtl_run), "--overwrite",
                           *[a for s in [*sets, "strategy.evaluate-clients=50"] for a in ("--set", s)]], memory=True)
    flower = timed_command([sys.executable, __file__, "_flower", str(flower_run), *sets], memory=True)
    loop = sequential(sets)
    rows = [json.loads(line) for line in (flower_run / "flower.jsonl").read_text().splitlines()]
    flower_rounds = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
    fedtl_rounds = rounds_of(fedtl_run)
    res["pfl"] = {
        "workload": "1,000 clients of 50 generated 16-px images each (of 100,000), 50 trained a round, 200 rounds, "
                    "1 local epoch in batches of 10, small-cnn from scratch, full fine-tuning (pfl-research's "
                    "CIFAR-10 benchmark shape; theirs runs 1,500 rounds); fedtl's final evaluation on 50 clients",
        "fedtl": {**fedtl, "median_round_s": statistics.median(fedtl_rounds), "final_accuracy": final_accuracy(fedtl_run)},
        "flower": {**flower, "median_round_s": statistics.median(flower_rounds), "final_accuracy": rows[-1].get("accuracy")},
        "sequential": loop,
        "ratio_fedtl_over_sequential": fedtl["wall_s"] / loop["wall_s"],
        "ratio_flower_over_fedtl": flower["wall_s"] / fedtl["wall_s"],
    }


def section_big(res: dict[str, Any]) -> None:
    """A 20,400-image pool at 224 px (100 clients x 200 + 400 test): does it fit, and what does it take?"""
    images = make_images(WORK / "images224-20k", clients=100)
    weights = WORK / "mobilenet_v3_small.safetensors"
    if not weights.exists():
        from safetensors.torch import save_file

        save_file(calibrated_network(make_images(WORK / "images224")), str(weights))
    run = WORK / "big"
    store = WORK / "store-20k"
    shutil.rmtree(store, ignore_errors=True)  # the store's decode is part of what is measured
    sets = [*cache_sets(images, weights, "auto"), "clients=100", "strategy.fraction-train=0.1", "rounds=3",
            f"data.store-dir='{store}'"]
    m = timed_command([*FEDTL, "simulate", "--out", str(run), "--overwrite", *[a for s in sets for a in ("--set", s)]],
                      memory=True)
    pool_bytes = 20_400 * 3 * 224 * 224
    res["big"] = {"workload": "20,400 generated JPEGs at 224 px (100 clients x 200 + 400 test), mobilenet_v3_small, "
                              "feature extraction with the cache, fraction-train 0.1, 3 rounds, store built in the run",
                  **m, "pool_uint8_gb": pool_bytes / 2**30, "round_s": rounds_of(run),
                  "final_accuracy": final_accuracy(run), "machine_memory_gb": psutil.virtual_memory().total / 2**30}


SECTIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "bare": section_bare, "cache": section_cache, "study": section_study, "dp": section_dp, "scale": section_scale,
    "population": section_population, "pfl": section_pfl,
    "big": section_big}


# -- report -------------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> str:
    rows = []
    if "bare" in res:
        b = res["bare"]
        rows.append(("fedtl / bare Flower app, default study", f"{b['ratio_fedtl_over_bare']:.2f}x", "<= 1.10x",
                     f"{statistics.median(b['fedtl_wall_s']):.1f} s vs {statistics.median(b['bare_wall_s']):.1f} s"))
    if "cache" in res:
        c = res["cache"]
        rows += [
            ("224 px feature extraction: cache off / on", f"{c['speedup_off_over_on']:.2f}x", ">= 5x",
             f"{c['off']['wall_s']:.0f} s vs {c['on']['wall_s']:.0f} s; accuracy {c['on']['final_accuracy']:.4f} on, "
             f"{c['off']['final_accuracy']:.4f} off ({c['accuracy_points_on_minus_off']:+.2f} points)"),
            ("fedtl (cache on) / compute floor", f"{c['ratio_fedtl_over_floor']:.2f}x", "<= 1.5x",
             f"{c['on']['wall_s']:.1f} s vs floor {c['floor']['total_s']:.1f} s = forward "
             f"{c['floor']['forward_all_s']:.1f} + head {c['floor']['head_training_s']:.1f}; a bare Flower run of an "
             f"empty model takes {c['floor']['flower_empty_model_s']:.1f} s"
             + ("; fedtl's run: " + ", ".join(f"{k} {v:.1f} s" for k, v in c["on_parts_s"].items())
                if "on_parts_s" in c else "")),
            ("fedtl (cache on) / sequential loop in one process", f"{c['ratio_fedtl_over_sequential']:.2f}x", "(shown)",
             f"loop {c['sequential']['wall_s']:.1f} s, accuracy {c['sequential']['final_accuracy']:.4f}"),
            ("peak memory, all processes, cache on (PSS)", f"{c['on']['peak_pss_gb']:.2f} GB",
             f"<= pool {c['pool_uint8_gb']:.2f} + 1.5 GB", f"RSS summed {c['on']['peak_rss_gb']:.2f} GB (counts shared "
             f"pages once per process); cache off PSS {c['off']['peak_pss_gb']:.2f} GB"),
        ]
        if "bare_flower_3_rounds" in c:
            bare = c["bare_flower_3_rounds"]
            rows.append(("peak memory above a bare Flower app on this workload (PSS)",
                         f"{c['peak_pss_over_bare_gb']:+.2f} GB", "(shown)",
                         f"the bare app (same processes: driver, actors, Ray) peaks at {bare['peak_pss_gb']:.2f} GB"))
    if "study" in res:
        s = res["study"]
        before, after = s["per-run start-up (before)"], s["one runtime per study (after)"]
        rows.append(("6-run study: fixed cost per run, after / before", f"{s['ratio_fixed_after_over_before']:.2f}x",
                     "<= 0.25x", f"{after['per_run_fixed_s']:.1f} s vs {before['per_run_fixed_s']:.1f} s; study "
                     f"{after['wall_s']:.0f} s vs {before['wall_s']:.0f} s"))
    if "dp" in res:
        for mode in ("feature-extraction", "lora"):
            d = res["dp"][mode]
            rows.append((f"DP-SGD / SGD, {mode}, cached features, local training only", f"{d['ratio_dp_over_sgd']:.2f}x",
                         "(shown)", f"{d['dp_sgd_s']:.3f} s vs {d['sgd_s']:.3f} s per client round"))
        if "run" in res["dp"]:
            r = res["dp"]["run"]
            rows.append(("DP-SGD / SGD, head only, cached features, whole 224-px run", f"{r['ratio_dp_over_sgd']:.2f}x",
                         "<= 1.5x", f"{r['dp-sgd']['wall_s']:.1f} s vs {r['sgd']['wall_s']:.1f} s; accuracy "
                         f"{r['dp-sgd']['final_accuracy']:.4f} vs {r['sgd']['final_accuracy']:.4f}"))
    if "scale" in res:
        for n in ("100", "1000"):
            s = res["scale"][n]
            per_client = s["median_round_s"] / max(1, round(int(n) * 0.1))
            rows.append((f"{n} virtual clients, fraction 0.1", f"{s['median_round_s']:.2f} s/round", "flat",
                         f"{per_client:.3f} s per client a round trains; peak PSS {s['peak_pss_gb']:.2f} GB, RSS summed "
                         f"{s['peak_rss_gb']:.2f} GB, wall {s['wall_s']:.0f} s"))
    if "population" in res:
        p = res["population"]
        for n in map(str, POPULATIONS):
            q = p[n]
            rows.append((f"{int(n):,} registered clients, 50 trained a round", f"{q['median_round_s']:.2f} s/round",
                         "", f"fixed (outside the rounds) {q['fixed_s']:.1f} s, peak PSS {q['peak_pss_gb']:.2f} GB, "
                         f"wall {q['wall_s']:.0f} s"))
        rows.append((f"{POPULATIONS[-1]:,} against {POPULATIONS[0]} registered clients: fixed cost",
                     f"{p['fixed_ratio']:.2f}x", "<= 2x", ""))
        rows.append((f"{POPULATIONS[-1]:,} against {POPULATIONS[0]} registered clients: median round",
                     f"{p['round_ratio']:.2f}x", "<= 1.5x", ""))
        rows.append((f"{POPULATIONS[-1]:,} against {POPULATIONS[0]} registered clients: peak memory (PSS)",
                     f"{p['memory_growth_gb']:+.2f} GB", "<= +0.5 GB", ""))
        if "sequential" in p:
            c = 1000 * p["sequential"]["client_mean_s"]
            for n in ("100", "1000"):
                rows.append((f"cost per trained client above its compute, {int(n):,} registered",
                             f"{p['overhead_per_client_ms'][n]:.1f} ms", "<= 5 ms",
                             f"median round / 50 = {1000 * p[n]['median_round_s'] / 50:.1f} ms, compute (sequential "
                             f"loop, a client's mean) {c:.1f} ms"))
    if "pfl" in res:
        p = res["pfl"]
        f, fl, q = p["fedtl"], p["flower"], p["sequential"]
        rows.append(("1,000 clients, 50 a round, 200 rounds: fedtl / sequential loop in one process",
                     f"{p['ratio_fedtl_over_sequential']:.2f}x", "(shown)",
                     f"{f['wall_s']:.0f} s vs {q['wall_s']:.0f} s; accuracy {f['final_accuracy']:.4f} vs "
                     f"{q['final_accuracy']:.4f}"))
        rows.append(("1,000 clients, 50 a round, 200 rounds: plain Flower app on Flower's engine / fedtl",
                     f"{p['ratio_flower_over_fedtl']:.2f}x", "(shown)",
                     f"{fl['wall_s']:.0f} s vs {f['wall_s']:.0f} s; median round {fl['median_round_s']:.2f} s vs "
                     f"{f['median_round_s']:.2f} s; accuracy {fl['final_accuracy']:.4f}"))
    if "big" in res:
        g = res["big"]
        rows.append(("20,400-image 224-px pool: peak memory, all processes (PSS)", f"{g['peak_pss_gb']:.2f} GB",
                     f"fits {g['machine_memory_gb']:.0f} GB", f"pool as uint8 {g['pool_uint8_gb']:.2f} GB (mapped, "
                     f"shared); RSS summed {g['peak_rss_gb']:.2f} GB; wall {g['wall_s']:.0f} s with the store's decode; "
                     f"accuracy {g['final_accuracy']:.4f}"))
    lines = ["| measure | result | target | detail |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    if "bare" in res:
        bars += [("bare Flower", statistics.median(res["bare"]["bare_wall_s"])),
                 ("fedtl", statistics.median(res["bare"]["fedtl_wall_s"]))]
    if "cache" in res:
        c = res["cache"]
        bars += [("224px cache off", c["off"]["wall_s"]), ("224px cache on", c["on"]["wall_s"]),
                 ("224px floor", c["floor"]["total_s"]), ("224px sequential", c["sequential"]["wall_s"])]
    if "pfl" in res:
        p = res["pfl"]
        bars += [("1,000 clients x 200 rounds: fedtl", p["fedtl"]["wall_s"]),
                 ("... plain Flower app", p["flower"]["wall_s"]), ("... sequential loop", p["sequential"]["wall_s"])]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4477aa")
    ax.set_xlabel("wall seconds (one run each, same machine, same session)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_bare", "_bare_empty"):
        bare_app(sys.argv[2] or None, sys.argv[4:], Path(sys.argv[3]), empty=sys.argv[1] == "_bare_empty")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_flower":
        from federation import flower_app

        flower_app(sys.argv[3:], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "perf.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    res["machine"] = {"cores": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                      "platform": platform.platform(), "python": platform.python_version()}
    for name in args.only:
        t0 = time.perf_counter()
        SECTIONS[name](res)
        res.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        res["measured"] = time.strftime("%Y-%m-%d %H:%M")
        res.setdefault("section_measured", {})[name] = res["measured"]  # sections run alone keep their own dates
        path.write_text(json.dumps(res, indent=2) + "\n")  # after every section: nothing measured is lost
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    text = table(res)
    m = res["machine"]
    dates = ", ".join(f"{k} {v}" for k, v in res.get("section_measured", {}).items())
    (out / "perf.md").write_text(f"Measured on {m['cores']} cores, {m['memory_gb']} GB ({m['platform']}) by "
                                 f"`make bench-perf`; each section when last run: {dates}.\n\n{text}\n")
    plot(res, out / "perf.png")
    print(text)


if __name__ == "__main__":
    main()
