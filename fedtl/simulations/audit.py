"""The empirical privacy audit (``fedtl audit``): canaries in one client, runs at several epsilons, a lower bound each.

The auditor draws ``m`` canaries (``fedtl.data.canaries``) and their secret coins from fresh
entropy, plants the heads in the training data of client ``data.canary-client``, and runs the
same experiment once per privacy level: each finite epsilon under the config's privacy mode
(the noise calibrated to it), and ``inf`` without DP. After each run it scores every canary's
loss on the released model and guesses the coins (``fedtl.reports.audit``): the number right
gives a lower bound on epsilon at 95% confidence, set beside the accountant's upper bound for
that client. The coins stay in the audit folder (``canaries.safetensors``, owner-only); clients
read only the planted canaries (``planted.safetensors``), never the coins.

An audit folder is resumable like a study: a finished level is scored again from its run folder,
an interrupted one continues from its checkpoint, and the coins are drawn once, with the test they
are scored by (``audit-spec.json``: canaries, guesses, confidence, delta), which no later call changes.

Each level's lower bound is set beside the epsilon of the adjacency its canary flip is
(``PrivacyMode.canary_flip``): under client-level DP the canary client stays in and its update
changes, which is replace-one, not the zero-out epsilon the run is calibrated to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtl.config import ExperimentConfig
from fedtl.data.canaries import canary_images, fresh_seed, make_canaries, read_canaries, write_canaries
from fedtl.data.federated import scenario, task
from fedtl.data.rows import LabelledImages
from fedtl.errors import ConfigError, StudyError
from fedtl.privacy import PRIVACY_MODES
from fedtl.reports import audit as stats
from fedtl.reports.runs import to_json, write_atomic
from fedtl.run_folder import EPSILON_MAX, EPSILON_PER_CLIENT, EPSILON_REPLACE_ONE, FINAL_ACCURACY, SUMMARY_FILE
from fedtl.simulations.runtime import check_runtime, kept_warm, resolve_resources
from fedtl.simulations.study import run_or_resume, run_state

AUDITOR_FILE = "canaries.safetensors"  # every canary and its coin: the auditor's, never a client's
PLANTED_FILE = "planted.safetensors"  # the planted canaries: what data.canaries names
SPEC_FILE = "audit-spec.json"  # the test fixed with the coins: canaries, guesses, confidence, delta
AUDIT_FILE = "audit.json"
TABLE_FILE = "audit.md"
PLOT_FILE = "audit.png"
NO_DP = "off"  # the privacy mode of the epsilon = inf level


@dataclass(frozen=True)
class AuditSpec:
    """What an audit runs: its privacy levels and its test, fixed before any run.

    Attributes
    ----------
    epsilons : tuple of float
        Target epsilons, each one run (``math.inf``: the same run without DP).
    canaries : int, default 200
        ``m``: canaries drawn, each planted with probability 1/2.
    guesses : int, default 40
        ``r``: coins the auditor guesses (half planted, half not); the rest it abstains on.
    confidence : float, default 0.95
    """

    epsilons: tuple[float, ...]
    canaries: int = 200
    guesses: int = 40
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not self.epsilons or any(not e > 0 for e in self.epsilons):
            raise ConfigError(f"--epsilons {_labels(self.epsilons)}: give one or more epsilons above 0 (inf: no DP), "
                              "e.g. --epsilons 1,3,8,inf")
        if self.canaries < 2 or not 0 < self.guesses <= self.canaries:
            raise ConfigError(f"--canaries {self.canaries} --guesses {self.guesses}: the audit needs at least 2 "
                              "canaries and between 1 and that many guesses, e.g. --canaries 200 --guesses 40")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"confidence {self.confidence} must be in [0.5, 1)")


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,3,8,inf"`` as epsilons.

    Raises
    ------
    ConfigError
        If an item is not a number or ``inf``.
    """
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ConfigError(f"--epsilons {text!r}: give numbers separated by commas, inf for no DP, "
                          "e.g. --epsilons 1,3,8,inf") from None


def _label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def _labels(epsilons: Sequence[float]) -> str:
    return ",".join(_label(e) for e in epsilons)


def check_audit(cfg: ExperimentConfig, spec: AuditSpec) -> None:
    """Refuse, before any run, an audit that could not be done as asked.

    Raises
    ------
    ConfigError
        A finite epsilon without an accounted privacy mode; a text scenario (canaries are images).
    """
    finite = [e for e in spec.epsilons if math.isfinite(e)]
    if finite and not PRIVACY_MODES.get(cfg.privacy.mode).accounted:
        raise ConfigError(f"privacy.mode = {cfg.privacy.mode!r} spends no epsilon, so epsilon = {_labels(finite)} "
                          "has nothing to audit: set the mode the audit tests, e.g. --set privacy.mode='dp-sgd' "
                          "(or 'client-level'); inf runs without DP")
    if task(cfg.data).tokens:
        raise ConfigError(f"data.scenario = {cfg.data.scenario!r} holds text; the audit's canaries are images: audit an "
                          "image scenario")


def level_config(cfg: ExperimentConfig, epsilon: float, out: Path) -> ExperimentConfig:
    """The run of one privacy level: ``cfg`` with the planted canaries, at ``epsilon`` (``inf``: without DP)."""
    privacy = (dataclasses.replace(cfg.privacy, mode=NO_DP) if math.isinf(epsilon)
               else dataclasses.replace(cfg.privacy, target_epsilon=epsilon, max_epsilon=0.0))
    return cfg.replace(name=f"{cfg.name}/eps-{_label(epsilon)}", out=str(out / f"eps-{_label(epsilon)}"),
                       data=dataclasses.replace(cfg.data, canaries=str(out / PLANTED_FILE)), privacy=privacy)


def draw_canaries(cfg: ExperimentConfig, spec: AuditSpec, out: Path, *, overwrite: bool,
                  trained: bool = False) -> dict[str, Any]:
    """The audit's canaries and coins: drawn from fresh entropy once (``overwrite``: again), then read back.

    ``trained``: runs in ``out`` were trained on the folder's canaries, so new coins would not be theirs.
    """
    sc = scenario(cfg.data)
    shape = tuple(sc.pool_x.shape[1:])
    auditor, planted, fixed = out / AUDITOR_FILE, out / PLANTED_FILE, out / SPEC_FILE
    test = fixed_test(cfg, spec)
    if auditor.is_file() and planted.is_file() and not overwrite:
        check_fixed_test(fixed, test)
        held = read_canaries(auditor)
        if len(held["labels"]) != spec.canaries or tuple(held["images"].shape[1:]) != shape:
            raise StudyError(f"{out} holds an audit of {len(held['labels'])} canaries of shape "
                             f"{tuple(held['images'].shape[1:])}; this one needs {spec.canaries} of {shape}: pass "
                             "--overwrite to start it again, or another --out")
        return held
    if trained and not overwrite:
        raise StudyError(f"{out} holds runs trained on canaries whose files ({AUDITOR_FILE}, {PLANTED_FILE}) are gone: "
                         "new coins would not be the ones they trained on. Pass --overwrite to start the audit again")
    images, labels, included = make_canaries(spec.canaries, shape=shape, num_classes=sc.num_classes, seed=fresh_seed())
    out.mkdir(parents=True, exist_ok=True)
    write_canaries(auditor, images, labels, included)
    os.chmod(auditor, 0o600)  # the coins are the test's secret: owner-only, like a private key
    write_canaries(planted, images[included], labels[included])
    write_atomic(fixed, to_json(test, indent=2) + "\n")  # the test, fixed with the coins before any run
    return {"images": images, "labels": labels, "included": included}


def fixed_test(cfg: ExperimentConfig, spec: AuditSpec) -> dict[str, Any]:
    """What the audit's bound depends on besides the runs: canaries, guesses, confidence and delta."""
    return {"canaries": spec.canaries, "guesses": spec.guesses, "confidence": spec.confidence,
            "delta": cfg.privacy.delta}


def check_fixed_test(path: Path, test: dict[str, Any]) -> None:
    """Refuse to score an audit folder with another test than the one fixed with its coins.

    Choosing the number of guesses (or the confidence, or delta) after seeing the scores would void the
    confidence the bound claims, so the folder's first call fixes them (``audit-spec.json``) and every later
    call must ask for the same.

    Raises
    ------
    StudyError
        If the folder fixed other numbers, or (an audit from before they were fixed) none.
    """
    if not path.is_file():
        raise StudyError(f"{path.parent} holds canaries but no {SPEC_FILE}: its guesses were never fixed before its "
                         "runs, so no score from it holds its confidence. Pass --overwrite to draw new canaries and "
                         "run the audit again")
    held = json.loads(path.read_text())
    changed = [f"{k} {held.get(k)} (asked: {v})" for k, v in test.items() if held.get(k) != v]
    if changed:
        flags = " ".join(f"--{k} {held[k]}" for k in ("canaries", "guesses") if k in held)
        raise StudyError(f"{path.parent} fixed its test before its first run: {'; '.join(changed)}. Scoring its runs "
                         "with numbers chosen after seeing their scores would void the bound's confidence. Ask for "
                         f"the fixed ones ({flags}, and the same privacy.delta), or pass --overwrite to draw new "
                         "canaries and run the audit again")


def run_audit(cfg: ExperimentConfig, spec: AuditSpec, out: Path, *, overwrite: bool = False,
              console: Console | None = None, simulate: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every level of ``spec`` not finished in ``out``, score each, and write ``audit.json``, ``.md``, ``.png``.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment audited (its privacy mode, delta and clipping; its rounds, clients and data).
    spec : AuditSpec
        Levels, canaries and guesses.
    out : Path
        The audit folder: the coins, the planted canaries and one run folder per level.
    overwrite : bool, default False
        Draw new canaries and rerun every level.
    console : Console, optional
        Where progress goes.
    simulate : callable, optional
        ``simulate(cfg, overwrite=..., resume=...)``; default the Ray simulation.

    Returns
    -------
    dict
        What ``audit.json`` holds: the spec, and per level its accounted epsilon, the audit's bound and
        whether the bound refutes the accounted epsilon.
    """
    if simulate is None:
        from fedtl.simulations.simulate import simulate
    console = console or Console()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file, not a folder: name a folder for the audit")
    check_audit(cfg, spec)
    from fedtl.server.app import check_server_config  # the server's own checks, which import Flower

    levels = []
    for e in spec.epsilons:  # every level checked before any runs: a refused one fails now, not after an hour
        level = level_config(cfg, e, out)
        check_server_config(level)
        check_runtime(level)
        levels.append(resolve_resources(level))  # as the run records it, so a rerun recognises it
    states = {c.out: ("new" if overwrite else run_state(c)) for c in levels}  # a foreign run refuses before any work
    canaries = draw_canaries(cfg, spec, out, overwrite=overwrite, trained=any(v != "new" for v in states.values()))
    with kept_warm():  # one Ray instance for every level
        for i, level in enumerate(levels):
            console.rule(f"[{i + 1}/{len(levels)}] audit at epsilon = {_label(spec.epsilons[i])}")
            if states[level.out] == "done":
                console.print(f"already run: {level.out}")
                continue
            run_or_resume(level, states[level.out], simulate, overwrite=overwrite, console=console)
    sc = scenario(cfg.data)
    images = canary_images(out / AUDITOR_FILE, shape=tuple(sc.pool_x.shape[1:]), num_classes=sc.num_classes)
    rows = [_score(level, e, images, canaries["included"], spec) for level, e in zip(levels, spec.epsilons, strict=True)]
    result = {"spec": {**dataclasses.asdict(spec), "epsilons": [_label(e) for e in spec.epsilons],
                       "canary_client": cfg.data.canary_client, "mode": cfg.privacy.mode},
              "levels": rows}
    write_atomic(out / AUDIT_FILE, to_json(result, indent=2) + "\n")
    header, cells = stats.audit_table(rows)
    from fedtl.reports.results import markdown_table

    write_atomic(out / TABLE_FILE, f"# Privacy audit: {cfg.name}\n\n{markdown_table(header, cells)}\n\n"
                                   f"{stats.TABLE_NOTE.format(**result['spec'], alarm=1 - spec.confidence)}\n")
    stats.plot_audit(rows, out / PLOT_FILE, title=f"{cfg.name}: accounted epsilon and the audit's lower bound")
    return result


def accounted_epsilon(level: ExperimentConfig, privacy: dict[str, Any]) -> float | None:
    """The accountant's epsilon an audit of ``level`` compares its lower bound with, from its summary's
    ``privacy`` section: the one of the adjacency a canary flip is under its mode (``PrivacyMode.canary_flip``).
    Client-level: flipping a canary changes the canary client's update while it stays in, so replace-one, not
    the zero-out epsilon the noise is calibrated to (at 5 rounds, 3 of 3 clients: 2.118 against 0.990 for a
    target of 1). DP-SGD: the canary is added to the client's data or not, so its add-or-remove epsilon."""
    if PRIVACY_MODES.get(level.privacy.mode).canary_flip == "replace-one":
        return privacy.get(EPSILON_REPLACE_ONE)
    return privacy.get(EPSILON_PER_CLIENT, {}).get(str(level.data.canary_client), privacy.get(EPSILON_MAX))


def _score(level: ExperimentConfig, epsilon: float, images: LabelledImages, included: torch.Tensor,
           spec: AuditSpec) -> dict[str, Any]:
    """One level's row of ``audit.json``: its run's canary losses scored against the coins."""
    run = Path(level.out)
    summary = json.loads((run / SUMMARY_FILE).read_text())
    found = stats.audit(stats.canary_losses(run, images), included, guesses=spec.guesses,
                        delta=level.privacy.delta, confidence=spec.confidence)
    flip = PRIVACY_MODES.get(level.privacy.mode).canary_flip
    accounted = math.inf if math.isinf(epsilon) else accounted_epsilon(level, summary.get("privacy", {}))
    refuted = accounted is not None and found.epsilon_lower_bound > accounted
    return {"epsilon": _label(epsilon), "mode": level.privacy.mode, "adjacency": flip, "accounted_epsilon": accounted,
            **found.as_dict(), "refuted": refuted, FINAL_ACCURACY: summary.get(FINAL_ACCURACY),
            "run": run.name}
