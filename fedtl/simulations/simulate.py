"""Run an experiment on Flower's simulation runtime (Ray), and the from-scratch comparison.

The one call to Flower's ``run_simulation`` is in ``simulate``. Flower 1.42 deprecates it in
favour of ``flwr run`` with a local SuperLink (``flower-superlink --simulation``), which fedtl's
``[tool.flwr.app]`` already supports (``flwr run . --stream``); when Flower drops it, this call
site is what moves. Quiet by default: Flower's and Ray's output goes to ``<run>/flower.log``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtl.clients.app import make_client_app
from fedtl.config import ExperimentConfig
from fedtl.data.federated import check_partitions, verify_store
from fedtl.errors import RunFolderError
from fedtl.models.factory import build_model
from fedtl.models.pretrain import ensure_pretrained, pretrains_itself
from fedtl.personalisation import run_model
from fedtl.reports.plots import plot_accuracy
from fedtl.reports.runs import holds_run, read_metrics
from fedtl.run_folder import (
    ACCURACY_PLOT,
    BEST_ACCURACY,
    FINAL_ACCURACY,
    LOG_FILE,
    OUT_DIR,
    RUN_FILES,
    SCRATCH_BEST_ACCURACY,
    SCRATCH_DIR,
    SCRATCH_FINAL_ACCURACY,
    SUMMARY_FILE,
    TRANSFER_GAIN,
)
from fedtl.server.app import make_server_app, private_strategy, run_dir
from fedtl.server.checkpoint import read_resume
from fedtl.server.record import Terminal, write_summary
from fedtl.simulations.backend import LOCAL_RAY_SETTINGS, fedtl_backend
from fedtl.simulations.logs import flower_log_copy, quiet_output
from fedtl.simulations.node_state import NodeStates, check_resumable
from fedtl.simulations.reaper import watch_descendants
from fedtl.simulations.runtime import check_runtime, kept_warm, resolve_resources

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod


def prepare_run_dir(cfg: ExperimentConfig, *, overwrite: bool = False, clear: bool = True,
                    resume: bool = False) -> ExperimentConfig:
    """Fix the run folder as an absolute path; refuse a folder holding a run unless ``overwrite``.

    With ``overwrite``, only the files a run writes are removed (other files stay); ``clear = False``
    leaves that to ``clear_run_dir``, once the run is sure to start. With ``resume`` the folder must
    hold the run, and it stays.
    """
    out = run_dir(cfg).resolve()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder: name a folder for the run (it is created if missing)")
    if resume:
        cfg = cfg.replace(out=str(out))
        read_resume(out)  # refuses a folder with no readable checkpoint, saying so
        check_resumable(cfg)
        return cfg
    if holds_run(out):
        if not overwrite:
            raise RunFolderError(f"{out} already holds a run; pass --overwrite to replace it, or another --out")
        if clear:
            clear_run_dir(out)
    return cfg.replace(out=str(out))


def clear_run_dir(out: Path) -> None:
    """Remove the files a run writes (and its baseline's folder) from ``out``; other files stay."""
    for name in (*RUN_FILES, SCRATCH_DIR):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def simulate(cfg: ExperimentConfig, *, overwrite: bool = False, verbose: bool = False,
             table_every: int = 1, mods: Sequence[Mod] = (), resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.clients`` virtual clients on Ray; return its summary.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment; ``cfg.out`` (or ``runs/<name>-<time>``) receives the run folder.
    overwrite : bool, default False
        Replace a run already in that folder.
    verbose : bool, default False
        Show Flower's and Ray's logs live. By default they go to ``<run>/flower.log`` and the
        terminal shows only fedtl's round table and progress bar.
    table_every : int, default 1
        Print every this many rounds' table lines (the last always; all are in ``metrics.jsonl``).
    mods : sequence of Flower mods, default ()
        Around every virtual client (``make_client_app``): a study of faulty or hostile clients
        wraps them this way (``tests/faults.py``). Ray pickles them: module-level functions.
    resume : bool, default False
        Continue the run already in ``cfg.out`` from its resume checkpoint (``fedtl.server.checkpoint``):
        ``cfg`` must be the run's own ``config.toml``.
    """
    cfg = resolve_resources(prepare_run_dir(cfg, overwrite=overwrite, clear=False, resume=resume))
    out = Path(cfg.out)
    if verbose:
        preflight(cfg)
        if not resume:
            clear_run_dir(out)  # only now: a refused config leaves the run it would replace as it was
        with flower_log_copy(out):
            return _simulate(cfg, Terminal(table_every=table_every), mods, resume)
    # Before the run folder is made or cleared, so that a refused config leaves it as it was; what
    # Flower logs meanwhile (its strategies' warnings) joins the run's log once the run starts.
    with tempfile.TemporaryDirectory() as tmp:
        early = Path(tmp) / LOG_FILE
        with quiet_output(early):
            preflight(cfg)
        if not resume:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / LOG_FILE).open("a") as log, early.open() as first:
            shutil.copyfileobj(first, log)
    with quiet_output(out / LOG_FILE) as console:
        return _simulate(cfg, Terminal(console, quiet=True, table_every=table_every), mods, resume)


def preflight(cfg: ExperimentConfig) -> None:
    """Everything that can refuse ``cfg`` before a simulation starts, and the pre-training it needs (once, here)."""
    check_runtime(cfg)  # resources Ray could never give would make Flower wait for ever
    verify_store(cfg.data)  # the data decoded into this machine's store (or checked there) once, before the clients map it
    check_partitions(cfg.data, cfg.clients, cfg.seed)  # here, rather than as an error in every client
    # A privacy set-up the mode refuses fails here, with its own message, before any pre-training
    # (the check needs the model's structure, not its weights).
    private_strategy(cfg, run_model(cfg.replace(init="scratch")))
    if pretrains_itself(cfg):
        ensure_pretrained(cfg)  # once here, rather than racing in every client process
    elif cfg.init == "pretrained":
        build_model(cfg)  # outside weights: a missing or mismatched file fails here, not in every client


def _simulate(cfg: ExperimentConfig, terminal: Terminal, mods: Sequence[Mod] = (), resume: bool = False) -> dict[str, Any]:
    from flwr.simulation import run_simulation  # heavy import: only when a run starts

    rc = cfg.to_run_config()
    resources = {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus}
    backend: dict[str, Any] = {"client_resources": resources}
    # Flower's Ray backend passes init_args to ray.init: a cluster's address, or this machine's Ray's settings
    backend["init_args"] = {"address": cfg.simulation.ray_address} if cfg.simulation.ray_address \
        else {"_system_config": LOCAL_RAY_SETTINGS}
    watch_descendants()  # Ray's processes end with this one, even if it is killed
    checkpoint = read_resume(Path(cfg.out)) if resume else None
    states = NodeStates(Path(cfg.out), checkpoint_every=cfg.checkpoint_every,
                        resume_round=checkpoint.round if checkpoint else None)
    # A dead or hung client process is replaced; each node's state is kept on disk for a resume.
    with fedtl_backend(limit_s=cfg.strategy.round_timeout, states=states):
        run_simulation(
            server_app=make_server_app(rc, terminal, checkpoint, population=cfg.clients),
            client_app=make_client_app(rc, mods),
            num_supernodes=cfg.clients, backend_config=backend,
        )
    summary_path = Path(cfg.out) / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see {Path(cfg.out) / LOG_FILE}")
    return json.loads(summary_path.read_text())


def simulate_with_scratch(cfg: ExperimentConfig, *, overwrite: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run ``cfg`` and its from-scratch baseline; add the transfer gain to the summary.

    The baseline (``ExperimentConfig.as_scratch``) goes to ``<run>/scratch``; its table shows every
    fifth round. The run's ``summary.json`` gains ``scratch_final_accuracy``, ``scratch_best_accuracy``
    and ``transfer_gain`` (final accuracy pre-trained minus scratch, after the same rounds).
    """
    with kept_warm():  # the baseline runs on the same Ray instance and actors
        summary = simulate(cfg, overwrite=overwrite, verbose=verbose)  # with overwrite, this also clears <run>/scratch
        out = Path(summary[OUT_DIR])
        scratch_cfg = cfg.as_scratch().replace(out=str(out / SCRATCH_DIR))
        scratch = simulate(scratch_cfg, overwrite=overwrite, verbose=verbose, table_every=5)
    summary.update({
        SCRATCH_FINAL_ACCURACY: scratch[FINAL_ACCURACY], SCRATCH_BEST_ACCURACY: scratch[BEST_ACCURACY],
        TRANSFER_GAIN: summary[FINAL_ACCURACY] - scratch[FINAL_ACCURACY],
    })
    write_summary(out, summary)
    plot_accuracy(
        {"pre-trained": read_metrics(out), "scratch": read_metrics(out / SCRATCH_DIR)},
        out / ACCURACY_PLOT, title=f"{cfg.name} ({cfg.finetune.mode}): transfer gain {summary[TRANSFER_GAIN]:+.3f}",
    )
    return summary
