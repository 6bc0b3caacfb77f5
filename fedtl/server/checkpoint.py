"""The resume checkpoint: what the server needs to continue a run after its last finished round.

``checkpoints/resume.safetensors`` is written atomically after every ``checkpoint-every``-th round
(and the last) and holds, as tensors: the global arrays after that round (``arrays/``: what the
next round starts from, in the dtypes they travel in), the state every round grows
from (``initial/``: the pre-trained reference and the starting head, FedNCM's included), the inner
strategy's carried state (``strategy/``: FedAdam's moments, FedAvgM's momentum) and numpy's random
state (not under client-level DP, whose noise it draws); and, as metadata: the round, the backbone fingerprint, the resolved config, the strategy's
other values (an adaptive clipping norm, a client-level DP accountant) and Python's random state
(Flower samples nodes with it). ``fedtl simulate --resume`` reads it back (``read_resume``); the
records (``metrics.jsonl``, ``privacy.jsonl``) are cut back to that round. The simulated nodes'
own state (personal layers, DP-SGD accountants) is the simulation's: ``fedtl.simulations.node_state``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from fedtl.errors import RunFolderError
from fedtl.reports.runs import to_json, write_atomic
from fedtl.run_folder import CHECKPOINTS_DIR, RESUME_FILE
from fedtl.strategies.state import strategy_state


@dataclass
class Resume:
    """A run's state after round ``round`` (see the module)."""

    round: int
    fingerprint: str
    config: str
    arrays: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    strategy_arrays: dict[str, np.ndarray]
    strategy_values: dict[str, Any]
    python_random: Any
    numpy_random: tuple[Any, ...] | None

    def restore_random(self) -> None:
        """Put Python's and numpy's global random states back as they were after the round (numpy's from fresh
        entropy where the checkpoint kept none)."""
        version, internal, gauss = self.python_random
        random.setstate((version, tuple(internal), gauss))
        if self.numpy_random is None:
            np.random.seed(None)
        else:
            np.random.set_state(self.numpy_random)


def resume_path(run_dir: Path) -> Path:
    """Where ``run_dir``'s resume checkpoint lives."""
    return Path(run_dir) / CHECKPOINTS_DIR / RESUME_FILE


def write_resume(run_dir: Path, *, rnd: int, fingerprint: str, config: str, arrays: dict[str, torch.Tensor],
                 initial: dict[str, torch.Tensor], strategy: tuple[dict[str, np.ndarray], dict[str, Any]],
                 numpy_random: bool = True) -> Path:
    """Write the resume checkpoint of round ``rnd`` (atomically: a run killed meanwhile keeps the previous one).

    ``numpy_random = False`` (numpy's state draws client-level DP noise): its state is not kept, since
    whoever read the file could regenerate the noise; a resumed run draws from fresh entropy.
    """
    carried, values = strategy
    tensors = {
        **{f"arrays/{k}": v.detach().cpu().contiguous().clone() for k, v in arrays.items()},
        **{f"initial/{k}": v.detach().cpu().contiguous().clone() for k, v in initial.items()},
        **{f"strategy/{k}": torch.from_numpy(np.ascontiguousarray(a)) for k, a in carried.items()},
    }
    numpy_meta = None
    if numpy_random:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["random/numpy"] = torch.from_numpy(keys.astype(np.int64))
        numpy_meta = [kind, pos, has_gauss, cached]
    version, internal, gauss = random.getstate()
    meta = {"round": rnd, "fingerprint": fingerprint, "config": config, "strategy": values,
            "python_random": [version, list(internal), gauss], "numpy_random": numpy_meta}
    return write_atomic(resume_path(run_dir), save(tensors, metadata={k: to_json(v) for k, v in meta.items()}))


def read_resume(run_dir: Path) -> Resume:
    """The resume checkpoint of ``run_dir``.

    Raises
    ------
    RunFolderError
        If there is none, or it cannot be read: naming the file and what to do.
    """
    path = resume_path(run_dir)
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no resume checkpoint ({path.name}): it was not written by a run with "
                             "checkpoint-every > 0, or no round had finished. Start the run again instead")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise RunFolderError(f"{path} cannot be read ({err}): start the run again") from None
    part = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + "/")}
            for p in ("arrays", "initial", "strategy")}
    numpy_random = None
    if meta["numpy_random"] is not None:
        kind, pos, has_gauss, cached = meta["numpy_random"]
        numpy_random = (kind, tensors["random/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
    return Resume(
        round=int(meta["round"]), fingerprint=meta["fingerprint"], config=meta["config"], arrays=part["arrays"],
        initial=part["initial"], strategy_arrays={k: v.numpy() for k, v in part["strategy"].items()},
        strategy_values=meta["strategy"], python_random=meta["python_random"], numpy_random=numpy_random,
    )


class ResumeWriter:
    """After each ``every``-th round (and the ``last``), write the resume checkpoint of the round's global arrays.

    Parameters
    ----------
    out : Path
        The run folder.
    fingerprint : str
        The backbone's fingerprint.
    initial : Mapping[str, torch.Tensor]
        The state every round grows from, copied here (as the strategy holds it when the run starts).
    strategy : Strategy
        The inner strategy, whose carried state (``fedtl.strategies.state``) each checkpoint holds.
    config : str
        The run's resolved config as TOML.
    schedule : tuple of (int, int, bool)
        ``every`` (0: never), ``last`` and ``numpy_random`` (``write_resume``).
    """

    def __init__(self, out: Path, fingerprint: str, initial: Mapping[str, torch.Tensor], strategy: Strategy,
                 config: str, schedule: tuple[int, int, bool]) -> None:
        self.out, self.fingerprint, self.strategy, self.config = out, fingerprint, strategy, config
        self.initial = {k: v.detach().cpu().clone() for k, v in initial.items()}
        self.every, self.last, self.numpy_random = schedule

    def __call__(self, rnd: int, arrays: ArrayRecord) -> None:
        if self.every and (rnd % self.every == 0 or rnd == self.last):
            write_resume(self.out, rnd=rnd, fingerprint=self.fingerprint, config=self.config,
                         arrays={k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}, initial=self.initial,
                         strategy=strategy_state(self.strategy), numpy_random=self.numpy_random)
