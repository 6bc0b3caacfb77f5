"""The ServerApp: plans each round, runs the strategy, evaluates centrally, records the run."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from functools import partial
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, RdpAccountant, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from fedtl.config import ExperimentConfig
from fedtl.data.federated import server_test_data
from fedtl.errors import RunFolderError, RunStoppedError
from fedtl.models.features import Feed
from fedtl.models.ncm import HEAD_INITS
from fedtl.models.transfer import TransferModel
from fedtl.personalisation import check_personal_plans, personal_plan, run_model
from fedtl.privacy import privacy_mode
from fedtl.protocol import ACCURACY, RoundPlan
from fedtl.reports.plots import plot_accuracy, plot_merge_error
from fedtl.run_folder import (
    ACCURACY_PLOT,
    BACKBONE_FINGERPRINT,
    CLIENT_ERRORS,
    HEAD_INIT,
    INITIAL_ACCURACY,
    LOCAL_KEYS,
    LORA_MERGE_ERROR,
    LORA_MERGE_ERROR_LAYERS,
    MERGE_ERROR_PLOT,
    MODEL_BYTES,
    STOPPED_EARLY,
    TOTAL_PARAMS,
    TRAVELLING_BYTES,
    TRAVELLING_PARAMS,
    TRAVELLING_RATIO,
)
from fedtl.seeds import derived_seed
from fedtl.server.checkpoint import Resume, ResumeWriter
from fedtl.server.evaluation import CentralEvaluation
from fedtl.server.head_start import head_start
from fedtl.server.ledger import PrivacyLedger
from fedtl.server.record import RunRecorder, Terminal
from fedtl.server.rounds import pull_sooner, run_rounds, wait_for_nodes
from fedtl.strategies.factory import lora_ranks, lora_stacking, min_nodes, run_strategy
from fedtl.strategies.grids import RegistrationOrder
from fedtl.strategies.privacy import wrap_private
from fedtl.strategies.registry import build_strategy
from fedtl.strategies.report import RoundObserver, RoundReport
from fedtl.strategies.state import load_strategy_state


def run_dir(cfg: ExperimentConfig) -> Path:
    """The run folder: ``cfg.out``, or ``runs/<name>-<time>`` when unset."""
    return Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_plans(cfg: ExperimentConfig, model: TransferModel) -> None:
    """Every round's plan checked by the privacy mode and the personalisation, before round one.

    Raises
    ------
    ConfigError, DPConfigError
        If the privacy mode or the personalisation refuses the model or a plan.
    """
    plans = [personal_plan(cfg, model.block_names, r) for r in range(1, cfg.rounds + 1)]
    privacy_mode(cfg).check_plans(model, plans)
    check_personal_plans(model, plans, cfg.strategy.personalisation)
    lora_stacking(cfg, model)
    lora_ranks(cfg, model)


def check_server_config(cfg: ExperimentConfig) -> None:
    """What ``run_server`` would refuse about ``cfg``, found without pre-training: the model's
    structure (adapters, local keys) and every round's plan, on randomly initialised weights.

    Raises
    ------
    ConfigError
        As ``check_plans``, or an adapter that finds no layer to adapt.
    """
    check_plans(cfg, run_model(cfg.replace(init="scratch")))


def seed_random(cfg: ExperimentConfig) -> None:
    """Seed the server's global random states as a run starts. Flower samples nodes with Python's: from
    ``cfg.seed``, so a run repeats. Its client-level DP wrappers draw their noise from numpy's: from fresh
    entropy under such a mode, never the seed, which config.toml shows to anyone holding the released models
    (who could regenerate the noise and subtract it)."""
    random.seed(derived_seed("server", cfg.seed))
    np.random.seed(None if privacy_mode(cfg).noised_update else derived_seed("server", cfg.seed))


def private_strategy(cfg: ExperimentConfig, model: TransferModel) -> tuple[Strategy, RdpAccountant | None]:
    """The run's Flower strategy inside its privacy mode's wrapper, after every round's plan is checked.

    Raises
    ------
    ConfigError, DPConfigError
        If the privacy mode or the personalisation refuses the model, the plans or the settings.
    """
    check_plans(cfg, model)
    return wrap_private(build_strategy(cfg), cfg)


def run_server(grid: Grid, cfg: ExperimentConfig, terminal: Terminal | None = None,
               resume: Resume | None = None) -> dict[str, Any]:
    """Run the whole federated fine-tuning of ``cfg`` on ``grid``; return the run's summary.

    ``terminal`` (a simulation's): where the round table goes and how; default stdout, Flower's log around it.
    ``resume``: continue the run in ``cfg.out`` after its checkpoint's round (``fedtl.server.checkpoint``).

    Raises
    ------
    RunFolderError
        If ``resume`` is of another config or another backbone.
    """
    model = run_model(cfg)
    plan = partial(personal_plan, cfg, model.block_names)
    check_resume(cfg, model, resume)
    test = server_test_data(cfg.data)
    inner, accountant = private_strategy(cfg, model)  # what can refuse the config does so before the run folder
    resumed = resume.round if resume is not None else None
    done = resumed or 0
    recorder = RunRecorder(run_dir(cfg), cfg, terminal, resume_round=resumed)
    ledger = privacy_ledger(cfg, recorder.out, accountant, resumed, plan)
    observe = round_observer(recorder, ledger)
    with closed_on_failure(recorder):  # as a failed round does: the terminal and Flower's log as they were
        start_model(grid, cfg, model, inner, resume, observe)
    strategy = run_strategy(cfg, model, inner, observer=observe, on_evaluate=recorder.on_client_evaluation)
    checkpoint = ResumeWriter(recorder.out, model.backbone_fingerprint, model.state_dict(), inner, cfg.to_toml(),
                              (cfg.checkpoint_every, cfg.rounds, not privacy_mode(cfg).noised_update))
    evaluate = CentralEvaluation(model, plan, test, Feed.of(cfg), recorder,
                                 (lambda: ledger.epsilon) if ledger is not None else None)
    evaluate.replay(done)
    plan(min(done + 1, cfg.rounds)).apply_to(model)  # the next round's travelling set
    arrays = ArrayRecord(model.travelling_state() if resume is None else resume.arrays)
    if resume is None:
        seed_random(cfg)
    else:
        resume.restore_random()
    with closing(recorder):  # a failed run leaves the terminal and Flower's log as they were
        stopped = until_stopped(cfg.rounds, lambda: run_rounds(
            strategy, grid, arrays, rounds=range(done + 1, cfg.rounds + 1), timeout=cfg.strategy.round_timeout,
            evaluate=evaluate, after_round=checkpoint))
    return finish_run(cfg, model, recorder, ledger, stopped)


def check_resume(cfg: ExperimentConfig, model: TransferModel, resume: Resume | None) -> None:
    """Refuse a resume checkpoint of another config or backbone than the run's.

    Raises
    ------
    RunFolderError
        If ``resume`` is of another config or another backbone.
    """
    if resume is not None and (resume.config != cfg.to_toml() or resume.fingerprint != model.backbone_fingerprint):
        raise RunFolderError(f"{cfg.out}: its resume checkpoint is of another config or backbone than the run's "
                             "config.toml; start the run again")


def privacy_ledger(cfg: ExperimentConfig, out: Path, accountant: RdpAccountant | None, resume_round: int | None,
                   plan: Callable[[int], RoundPlan]) -> PrivacyLedger | None:
    """The run's privacy ledger in ``out`` when its privacy mode is accounted (each round's local epochs from
    ``plan``), else ``None``."""
    privacy = privacy_mode(cfg)
    if not privacy.accounted:
        return None
    return PrivacyLedger(out, cfg, privacy, accountant, resume_round=resume_round,
                         round_epochs=lambda rnd: plan(rnd).local_epochs)


def round_observer(recorder: RunRecorder, ledger: PrivacyLedger | None) -> RoundObserver:
    """What each round's ``RoundReport`` updates: the round's line (why nodes failed too: a deployment's only
    record of a broken node; LoRA's merge error) and the privacy ledger."""
    def observe(report: RoundReport) -> None:
        errors: dict[str, Any] = {CLIENT_ERRORS: report.problems} if report.problems else {}
        if report.merge_error:
            errors |= {LORA_MERGE_ERROR: float(np.mean(list(report.merge_error.values()))),
                       LORA_MERGE_ERROR_LAYERS: report.merge_error}
        recorder.on_train(report.round, {**report.totals, **errors})
        if ledger is not None:
            ledger.on_round(report)

    return observe


@contextmanager
def closed_on_failure(recorder: RunRecorder) -> Iterator[None]:
    """Close ``recorder`` (the terminal and Flower's log as they were) if the block fails, and re-raise."""
    try:
        yield
    except BaseException:
        recorder.close()
        raise


def start_model(grid: Grid, cfg: ExperimentConfig, model: TransferModel, inner: Strategy, resume: Resume | None,
                observe: RoundObserver) -> None:
    """Put ``model`` and ``inner`` where the run starts: a resumed run's reference state and strategy state, or
    the head start's head (before the strategy copies the initial state: every round starts from it)."""
    if resume is not None:
        model.load_state_dict(resume.initial)  # the reference every round grows from, the head start's head included
        load_strategy_state(inner, resume.strategy_arrays, resume.strategy_values)
    elif HEAD_INITS.get(cfg.finetune.head_init).class_means:
        observe(head_start(grid, model, timeout=cfg.strategy.round_timeout, min_nodes=min_nodes(cfg.strategy),
                           max_examples=cfg.strategy.max_examples or float("inf")))


def until_stopped(rounds: int, run: Callable[[], object]) -> str | None:
    """Run ``run``; what stopped it early, if a spent budget or too few nodes did (not an error: every round up
    to the last is kept), else ``None``."""
    try:
        run()
    except (RunStoppedError, PrivacyBudgetExhausted) as err:
        stopped = f"stopped before round {rounds} ended: {err}"
        log(WARNING, "%s", stopped)
        return stopped
    return None


def finish_run(cfg: ExperimentConfig, model: TransferModel, recorder: RunRecorder, ledger: PrivacyLedger | None,
               stopped: str | None) -> dict[str, Any]:
    """Write the run's summary (the last round's travelling set against the whole model) and plots; return it."""
    size = model.size()
    summary = recorder.finish(**{
        TRAVELLING_PARAMS: size[TRAVELLING_PARAMS], TOTAL_PARAMS: size["model_params"],
        TRAVELLING_BYTES: size[TRAVELLING_BYTES], MODEL_BYTES: size[MODEL_BYTES],
        TRAVELLING_RATIO: size[TRAVELLING_BYTES] / size[MODEL_BYTES],
        "personalisation": cfg.strategy.personalisation, LOCAL_KEYS: len(model.local_keys),
        BACKBONE_FINGERPRINT: model.backbone_fingerprint, STOPPED_EARLY: stopped, HEAD_INIT: cfg.finetune.head_init,
        INITIAL_ACCURACY: recorder.rows[0][ACCURACY] if recorder.rows else None,
        "privacy": ledger.summary() if ledger is not None else {
            "mode": cfg.privacy.mode, "guarantee": privacy_mode(cfg).guarantee(cfg.privacy, 0.0, None, None)},
    })
    plot_accuracy({cfg.init: recorder.rows}, recorder.out / ACCURACY_PLOT, title=f"{cfg.name} ({cfg.finetune.mode})")
    plot_merge_error(recorder.rows, recorder.out / MERGE_ERROR_PLOT)
    if ledger is not None:
        ledger.plot(recorder.rows)
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None, terminal: Terminal | None = None,
                    resume: Resume | None = None, population: int = 0) -> ServerApp:
    """A ServerApp for ``run_config`` (a flattened ExperimentConfig); ``None`` reads the Context's.
    ``terminal``, ``resume``: see ``run_server``. ``population`` (a simulation's): the run starts once that many
    nodes are connected; Flower registers a simulation's nodes while its ServerApp starts, and a round sampled
    from part of them would differ from run to run (at 10,000 clients round 1 saw 2,802)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = ExperimentConfig.from_run_config(run_config if run_config is not None else context.run_config)
        wait_for_nodes(grid, population)
        pull_sooner(grid)
        run_server(RegistrationOrder(grid), cfg, terminal, resume)  # a seed samples the same nodes in any process

    return server


app = make_server_app()
