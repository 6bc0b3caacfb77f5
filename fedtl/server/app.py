"""The ServerApp: plans each round, runs the strategy, evaluates centrally, records the run."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, RdpAccountant, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from fedtl.config import ExperimentConfig
from fedtl.data.federated import server_test_data
from fedtl.errors import RunFolderError, RunStoppedError
from fedtl.models.features import Feed, frozen_prefix
from fedtl.models.metrics import central_evaluate
from fedtl.models.ncm import HEAD_INITS
from fedtl.models.transfer import TransferModel
from fedtl.personalisation import check_personal_plans, personal_plan, run_model
from fedtl.privacy import privacy_mode
from fedtl.protocol import ACCURACY, RoundPlan
from fedtl.reports.plots import plot_accuracy, plot_merge_error
from fedtl.seeds import derived_seed
from fedtl.server.checkpoint import Resume, write_resume
from fedtl.server.head_start import head_start
from fedtl.server.ledger import PrivacyLedger
from fedtl.server.record import RunRecorder, Terminal
from fedtl.strategies.lora import LORA_MERGES, MergeMeter, Ranks
from fedtl.strategies.nodes import TrainingNodes
from fedtl.strategies.privacy import wrap_private
from fedtl.strategies.registry import build_strategy, steps_server_optimiser, weight_key
from fedtl.strategies.report import RoundReport
from fedtl.strategies.stacking import Stacking
from fedtl.strategies.state import load_strategy_state, strategy_state
from fedtl.strategies.transfer import TransferStrategy


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


def preflight(cfg: ExperimentConfig) -> None:
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


def lora_stacking(cfg: ExperimentConfig, model: TransferModel) -> Stacking | None:
    """The run's stacked-LoRA merge when ``strategy.lora-merge`` folds, else ``None``.

    Raises
    ------
    ConfigError
        If the model's LoRA tensors cannot all be stacked (``Stacking``).
    """
    if not LORA_MERGES.get(cfg.strategy.lora_merge).folds:
        return None
    ft = cfg.finetune
    return Stacking(model.state_dict(), model.adapter_keys, model.local_keys, ft.lora_alpha / ft.lora_rank, cfg.seed)


def lora_ranks(cfg: ExperimentConfig, model: TransferModel) -> Ranks | None:
    """The cut and pad of adapters at each client's own rank, when ``strategy.lora-merge`` allows other
    ranks (hetlora, stack); else ``None``.

    Raises
    ------
    ConfigError
        If the model's adapters cannot be cut (``Ranks``: no LoRA, or FFA-LoRA's fixed A).
    """
    if not LORA_MERGES.get(cfg.strategy.lora_merge).any_rank:
        return None
    return Ranks(model.state_dict(), model.adapter_keys)


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
    if resume is not None:
        if resume.config != cfg.to_toml() or resume.fingerprint != model.backbone_fingerprint:
            raise RunFolderError(f"{cfg.out}: its resume checkpoint is of another config or backbone than the run's "
                                 "config.toml; start the run again")
    test = server_test_data(cfg.data)

    def plan(rnd: int) -> RoundPlan:
        return personal_plan(cfg, model.block_names, rnd)

    # Everything that can refuse the config does so before the run folder is written.
    privacy = privacy_mode(cfg)
    inner, accountant = private_strategy(cfg, model)
    done = resume.round if resume is not None else None
    recorder = RunRecorder(run_dir(cfg), cfg, terminal, resume_round=done)
    ledger = PrivacyLedger(recorder.out, cfg, privacy, accountant, resume_round=done,
                           round_epochs=lambda rnd: plan(rnd).local_epochs) if privacy.accounted else None

    def observe(report: RoundReport) -> None:
        # Why nodes failed goes into the round's line too: a deployment's only record of a broken node.
        errors = {"client_errors": report.problems} if report.problems else {}
        if report.merge_error:
            errors |= {"lora_merge_error": float(np.mean(list(report.merge_error.values()))),
                       "lora_merge_error_layers": report.merge_error}
        recorder.on_train(report.round, {**report.totals, **errors})
        if ledger is not None:
            ledger.on_round(report)

    timeout = cfg.strategy.round_timeout
    min_nodes = max(cfg.strategy.min_train_nodes, cfg.strategy.min_available_nodes)
    if resume is not None:
        model.load_state_dict(resume.initial)  # the reference every round grows from, the head start's head included
        load_strategy_state(inner, resume.strategy_arrays, resume.strategy_values)
    elif HEAD_INITS.get(cfg.finetune.head_init).class_means:
        # Before the strategy copies the initial state: the head every round starts from is the head start's.
        try:
            observe(head_start(grid, model, timeout=timeout, min_nodes=min_nodes,
                               max_examples=cfg.strategy.max_examples or float("inf")))
        except BaseException:
            recorder.close()  # as a failed round does: the terminal and Flower's log as they were
            raise
    strategy = TransferStrategy(
        inner=inner, plan=plan, keys_of=model.unit_keys, initial_state=model.state_dict(),
        fingerprint=model.backbone_fingerprint, observer=observe, final_round=cfg.rounds,
        on_evaluate=recorder.on_client_evaluation,
        training_nodes=lambda g: TrainingNodes(g, timeout),  # held out or not, and the examples each declares
        max_examples=cfg.strategy.max_examples or float("inf"), max_update_ratio=cfg.strategy.max_update_ratio,
        min_nodes=min_nodes,
        # Not under client-level DP: its wrapper noises the statistics with the rest, and the exact mean would leak them.
        statistics_by_mean=weight_key(cfg) if steps_server_optimiser(inner) and not privacy.noised_update else None,
        # Nor is the merge error measured there: it reads the clipped updates before the noise.
        merge_meter=None if privacy.noised_update else MergeMeter(model.state_dict(), model.adapter_keys,
                                                                   model.local_keys),
        stacking=lora_stacking(cfg, model), ranks=lora_ranks(cfg, model), weight_key=weight_key(cfg),
    )
    best = {"accuracy": max((r[ACCURACY] for r in recorder.rows if r["round"] > 0), default=-1.0)}
    how = Feed.of(cfg)
    # The server's test set through the feature cache, from the lowest cut any round so far trained above:
    # the blocks below it still hold the pre-trained weights.
    lowest = {"cut": len(model.block_names)}
    for rnd in range(1, (done or 0) + 1):  # the rounds a resumed run has behind it
        plan(rnd).apply_to(model)
        lowest["cut"] = min(lowest["cut"], frozen_prefix(model))

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()
        unknown = set(state) - set(model.state_dict())
        if unknown:
            raise ValueError(f"global model holds keys this model does not have: {sorted(unknown)[:5]}")
        model.load_state_dict(state, strict=False)
        plan(max(rnd, 1)).apply_to(model)
        lowest["cut"] = min(lowest["cut"], frozen_prefix(model))
        metrics = central_evaluate(model, test, how, cut=lowest["cut"])
        extra = {"epsilon": ledger.epsilon} if ledger is not None else {}
        row = recorder.end_round(rnd, metrics, travelling_params=model.size()["travelling_params"], **extra)
        meta = {"round": rnd, "accuracy": row[ACCURACY], "backbone_fingerprint": model.backbone_fingerprint}
        recorder.checkpoint("last", model.state_dict(), **meta)
        if rnd > 0 and row[ACCURACY] > best["accuracy"]:
            best["accuracy"] = row[ACCURACY]
            recorder.checkpoint("best", model.state_dict(), **meta)
        return MetricRecord(metrics)

    def after_round(rnd: int, arrays: ArrayRecord) -> None:
        if cfg.checkpoint_every and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
            write_resume(recorder.out, rnd=rnd, fingerprint=model.backbone_fingerprint, config=cfg.to_toml(),
                         arrays={k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}, initial=strategy_initial,
                         strategy=strategy_state(inner), numpy_random=not privacy.noised_update)

    strategy_initial = {k: torch.from_numpy(v) for k, v in strategy.initial.items()}
    if resume is None:
        plan(1).apply_to(model)
        first, arrays = 1, ArrayRecord(model.travelling_state())
        seed_random(cfg)
    else:
        plan(done + 1 if done < cfg.rounds else done).apply_to(model)
        first, arrays = done + 1, ArrayRecord(resume.arrays)
        resume.restore_random()
    stopped = None
    try:
        strategy.start(
            grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds, timeout=timeout, train_config=ConfigRecord(),
            evaluate_fn=evaluate, first_round=first, after_round=after_round,
        )
    except (RunStoppedError, PrivacyBudgetExhausted) as err:
        # The budget ends the run, not an error: everything up to the last round is kept.
        stopped = f"stopped before round {cfg.rounds} ended: {err}"
        log(WARNING, "%s", stopped)
    finally:
        recorder.close()  # a failed run leaves the terminal and Flower's log as they were
    size = model.size()  # the last round's travelling set against the whole model
    summary = recorder.finish(
        travelling_params=size["travelling_params"], total_params=size["model_params"],
        travelling_bytes=size["travelling_bytes"], model_bytes=size["model_bytes"],
        travelling_ratio=size["travelling_bytes"] / size["model_bytes"],
        personalisation=cfg.strategy.personalisation, local_keys=len(model.local_keys),
        backbone_fingerprint=model.backbone_fingerprint, stopped_early=stopped, head_init=cfg.finetune.head_init,
        initial_accuracy=recorder.rows[0][ACCURACY] if recorder.rows else None,
        privacy=ledger.summary() if ledger is not None else {
            "mode": cfg.privacy.mode, "guarantee": privacy.guarantee(cfg.privacy, 0.0, None, None)},
    )
    plot_accuracy({cfg.init: recorder.rows}, recorder.out / "accuracy.png", title=f"{cfg.name} ({cfg.finetune.mode})")
    plot_merge_error(recorder.rows, recorder.out / "lora_merge_error.png")
    if ledger is not None:
        ledger.plot(recorder.rows)
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None, terminal: Terminal | None = None,
                    resume: Resume | None = None) -> ServerApp:
    """A ServerApp for ``run_config`` (a flattened ExperimentConfig); ``None`` reads the Context's.
    ``terminal``, ``resume``: see ``run_server``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = ExperimentConfig.from_run_config(run_config if run_config is not None else context.run_config)
        run_server(grid, cfg, terminal, resume)

    return server


app = make_server_app()
