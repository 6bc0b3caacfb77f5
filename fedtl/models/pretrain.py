"""Pre-training of a backbone on the scenario's source data, cached on disk by its config.

Deterministic (fixed seed, single-threaded): every process that needs the backbone and
finds no cache computes bit-identical weights, on the same platform and torch build
(other machines should share the file; clients check its fingerprint). The file is
written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedtl.config import ExperimentConfig
from fedtl.data.federated import source_data
from fedtl.errors import WeightsError
from fedtl.models.backbones import BACKBONES, build_backbone
from fedtl.models.transfer import TransferModel, state_fingerprint

# Bump when the pre-training recipe changes, so stale caches are not reused.
RECIPE_VERSION = 1
log = logging.getLogger(__name__)


def pretrain_key(cfg: ExperimentConfig) -> dict[str, object]:
    """Everything the pre-trained weights depend on (and nothing else)."""
    p = cfg.pretrain
    return {
        "recipe": RECIPE_VERSION, "backbone": cfg.model.backbone, "norm": cfg.model.norm, "scenario": cfg.data.scenario,
        "image-size": cfg.data.image_size, "epochs": p.epochs, "lr": p.lr, "batch-size": p.batch_size,
        "augment": p.augment, "seed": p.seed,
    }


def pretrains_itself(cfg: ExperimentConfig) -> bool:
    """Whether the run's pre-trained backbone is fedtl's own: not scratch, not ``model.weights`` /
    ``weights-path``, not a family that ships its weights (minilm)."""
    ships = BACKBONES.get(cfg.model.backbone).ships_weights
    return cfg.init == "pretrained" and not (cfg.model.weights or cfg.model.weights_path or ships)


def pretrained_path(cfg: ExperimentConfig) -> Path:
    """Cache file of the backbone pre-trained for ``cfg``."""
    key = json.dumps(pretrain_key(cfg), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.pretrain.cache_dir) / f"{cfg.model.backbone}-{cfg.data.scenario}-{digest}.safetensors"


def pretrain(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Train the backbone (all blocks + a source head) on the source data; return the blocks' state.

    Parameters
    ----------
    cfg : ExperimentConfig
        Uses ``model.backbone``, ``data`` (scenario, image size) and ``pretrain``.
    """
    p = cfg.pretrain
    x, y, classes = source_data(cfg.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same summation order in every process
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            backbone = build_backbone(cfg.model.backbone, x.shape[1], cfg.model.norm, image_size=cfg.data.image_size)
            model = TransferModel(backbone, classes)
            model.set_trainable(model.block_names)
            opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=5e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs)
            augment = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
            g = torch.Generator().manual_seed(p.seed)
            model.train()
            for _ in range(p.epochs):
                for idx in torch.randperm(len(y), generator=g).split(p.batch_size):
                    xb = torch.stack([augment(img) for img in x[idx]]) if p.augment else x[idx]
                    opt.zero_grad()
                    F.cross_entropy(model(xb), y[idx]).backward()
                    opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("blocks.")}


def ensure_pretrained(cfg: ExperimentConfig) -> Path:
    """Return the cached pre-trained weights for ``cfg``, pre-training first if there are none."""
    path = pretrained_path(cfg)
    if path.is_file():
        problem = cache_problem(path)
        if problem is None:
            return path
        # The cache is fedtl's own, keyed by its recipe: a damaged file is computed again, not trusted.
        log.warning("pre-trained weights %s are damaged (%s); pre-training again", path, problem)
    state = pretrain(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fedtl-pretrain": json.dumps(pretrain_key(cfg), sort_keys=True), "fingerprint": state_fingerprint(state)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    return path


def cache_problem(path: Path) -> str | None:
    """Why the cached file at ``path`` cannot be used (unreadable, or its tensors not those it was written
    with), or ``None``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        return f"{type(err).__name__}: {str(err)[:120]}"
    if meta.get("fingerprint") != state_fingerprint(state):
        return "its tensors do not match the fingerprint it was written with"
    return None


def load_pretrained(model: TransferModel, path: Path) -> None:
    """Load a pre-trained blocks state (safetensors) into ``model``.

    Raises
    ------
    WeightsError
        If the file's tensors do not match the model's blocks (names or shapes).
    """
    load_blocks(model, load_file(str(path)), f"pre-trained weights {path} do not fit this backbone",
                "Delete the file to pre-train again.")


def load_blocks(model: TransferModel, state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Load the ``blocks.*`` tensors ``state`` into ``model`` (its head untouched).

    Raises
    ------
    WeightsError
        ``what``, the missing, unexpected and wrongly shaped tensors, then ``fix``, if they do not fit.
    """
    own = {k: v for k, v in model.state_dict().items() if k.startswith("blocks.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}. {fix}")
    model.load_state_dict(state, strict=False)
