"""Studies: a grid of runs over any config keys, with repeats (seeds), run one after another.

A study file names a base config, fixed overrides, a grid and seeds::

    [study]
    name = "modes"
    base = "digits.toml"          # relative to the study file; optional (the defaults)
    seeds = [0, 1, 2]
    scratch = true                # each run's from-scratch baseline too (the transfer gain)
    target-accuracy = 0.0         # efficiency: time and bytes to reach it; 0 = 90 % of the best
    skip-invalid = false          # true: grid points fedtl refuses are listed as skipped, not fatal

    [study.set]                   # applied to every run
    rounds = 10

    [study.grid]                  # the axes: every combination runs, for every seed
    "finetune.mode" = ["feature-extraction", "full"]

    [[study.case]]                # optional: settings that only go together (each case x the grid)
    "privacy.mode" = "off"
    [[study.case]]
    "privacy.mode" = "dp-sgd"
    "privacy.target-epsilon" = 3.0

Every run's config is built and validated (and its model's plans checked, without
pre-training: ``check_server_config``) before the first run starts. The study folder
holds ``study.toml`` (the file as given), ``plan.json`` (every run, its axes and folder),
``runs/<label>-s<seed>/`` and ``scratch/<label>-s<seed>/`` (ordinary run folders) and
``report/``. A rerun skips runs whose folder holds a finished run of the same config, and
reruns one that was interrupted; a folder holding a different config is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from fedtl.config import ExperimentConfig, load_config, resolve_key
from fedtl.config.fields import flatten
from fedtl.data.federated import check_partitions
from fedtl.errors import ConfigError, RunFolderError, StudyError
from fedtl.reports.runs import holds_run
from fedtl.run_folder import CONFIG_FILE, PLAN_FILE, PLAN_SCRATCH_DIR, PLAN_TARGET_ACCURACY, STUDY_FILE, SUMMARY_FILE
from fedtl.simulations.runtime import check_runtime, kept_warm, resolve_resources

_STUDY_KEYS = {"name", "base", "seeds", "scratch", "target-accuracy", "set", "grid", "case", "out", "skip-invalid"}


def toml_literal(value: Any) -> str:
    """``value`` written as a TOML literal (what ``--set key=value`` parses)."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


@dataclass(frozen=True)
class StudySpec:
    """A parsed study file.

    Attributes
    ----------
    name : str
        The study's name (default: the file's stem).
    base : Path or None
        The base config file; ``None``: the defaults.
    sets : tuple of str
        ``key=value`` overrides applied to every run, after the base.
    axes : tuple of (str, tuple)
        Grid axes in file order: full config key and its values.
    cases : tuple of dict
        Sets of settings that go together (full key -> value); every case runs with every grid point.
    seeds : tuple of int
        Repeats of every configuration.
    scratch : bool
        Whether each run's from-scratch baseline runs too.
    target_accuracy : float
        Accuracy the efficiency figures are measured to; 0 = 90 % of the best configuration's.
    out : str
        The study folder (default ``runs/study-<name>``).
    source : Path
        The study file; ``text`` its contents.
    skip_invalid : bool
        Whether grid points fedtl refuses (e.g. FedPer with feature extraction: nothing would
        travel) are skipped and listed, rather than stopping the study before it starts.
    """

    name: str
    base: Path | None
    sets: tuple[str, ...]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    cases: tuple[dict[str, Any], ...]
    seeds: tuple[int, ...]
    scratch: bool
    target_accuracy: float
    out: str
    source: Path
    text: str = field(repr=False)
    skip_invalid: bool = False


def _fail(path: Path, message: str) -> StudyError:
    return StudyError(f"study file {str(path)!r}: {message}")


def load_study(path: str | Path) -> StudySpec:
    """Parse and check a study file (see the module docstring for its form).

    Raises
    ------
    StudyError
        If the file is missing, not TOML, or its ``[study]`` table is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} does not exist (e.g. experiments/modes.toml)")
    text = path.read_text()
    try:
        raw = tomllib.loads(text).get("study")
    except tomllib.TOMLDecodeError as err:
        raise _fail(path, f"not valid TOML: {err}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "no [study] table; a study file names a base config, a grid and seeds")
    unknown = sorted(set(raw) - _STUDY_KEYS)
    if unknown:
        raise _fail(path, f"unknown [study] keys {unknown}; known: {sorted(_STUDY_KEYS)}")
    seeds = raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise _fail(path, f"seeds must be a non-empty list of integers >= 0, not {seeds!r}")
    axes = []
    for key, values in flatten(raw.get("grid", {})).items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid axis {key!r} must be a non-empty list of values, not {values!r}")
        axes.append((resolve_key(key), tuple(values)))
    sets = tuple(f"{resolve_key(k)}={toml_literal(v)}" for k, v in flatten(raw.get("set", {})).items())
    cases = raw.get("case", [{}])
    if not (isinstance(cases, list) and cases and all(isinstance(c, dict) for c in cases)):
        raise _fail(path, "case must be an array of tables ([[study.case]]), each a set of settings")
    cases = [{resolve_key(k): v for k, v in flatten(c).items()} for c in cases]
    base = raw.get("base")
    target = raw.get("target-accuracy", 0.0)
    if not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise _fail(path, f"target-accuracy must be in [0, 1], not {target!r}")
    name = str(raw.get("name", path.stem))
    return StudySpec(
        name=name, base=(path.parent / base) if base else None, sets=sets, axes=tuple(axes), cases=tuple(cases),
        seeds=tuple(seeds), scratch=bool(raw.get("scratch", True)), target_accuracy=float(target),
        out=str(raw.get("out", f"runs/study-{name}")), source=path, text=text,
        skip_invalid=bool(raw.get("skip-invalid", False)),
    )


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study: a case and grid point (``values``, named by ``label``) and a seed."""

    label: str
    values: dict[str, Any]
    seed: int
    cfg: ExperimentConfig
    scratch: ExperimentConfig | None = None


def _slug(values: dict[str, Any]) -> str:
    if not values:
        return "base"
    parts = [f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))[:120]


def _scratch_id(cfg: ExperimentConfig) -> str:
    body = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "out")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]


class StudyPlan(list[PlannedRun]):
    """The runs of a study, in order; ``skipped`` lists (label, reason) of the grid points refused."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[tuple[str, str]] = []


def plan_study(spec: StudySpec, out: Path) -> StudyPlan:
    """Every run of ``spec`` with its validated config, run folder and (shared) scratch baseline.

    Raises
    ------
    ConfigError
        If any grid point does not make a valid config or its plans are refused (nothing has
        run yet); with ``skip-invalid``, such points are listed in ``skipped`` instead.
    """
    from fedtl.server.app import check_server_config  # the server's own checks, which import Flower

    runs = StudyPlan()
    scratch_dirs: dict[str, Path] = {}
    keys = [k for k, _ in spec.axes]
    for case, combo in itertools.product(spec.cases, itertools.product(*(values for _, values in spec.axes))):
        values = {**case, **dict(zip(keys, combo, strict=True))}
        label = ", ".join(f"{k}={v}" for k, v in values.items()) or "base"
        for seed in spec.seeds:
            sets = [*spec.sets, *(f"{k}={toml_literal(v)}" for k, v in values.items()), f"seed={seed}"]
            try:
                cfg = load_config(spec.base, sets)
                check_server_config(cfg)
                check_runtime(cfg)
            except ConfigError as err:
                if not spec.skip_invalid:
                    raise StudyError(f"study {spec.name!r}, run {label} (seed {seed}): {err}") from None
                if all(lbl != label for lbl, _ in runs.skipped):
                    runs.skipped.append((label, str(err)))
                continue
            cfg = resolve_resources(cfg)  # as each run records it, so a rerun recognises its finished runs
            cfg = cfg.replace(name=f"{spec.name}/{_slug(values)}", out=str(out / "runs" / f"{_slug(values)}-s{seed}"))
            scratch = None
            if spec.scratch and cfg.init == "pretrained":
                base = cfg.as_scratch()
                try:
                    check_server_config(base)
                except ConfigError as err:
                    raise StudyError(f"study {spec.name!r}, run {label} (seed {seed}): its from-scratch baseline "
                                     f"(full fine-tuning, random init) is refused: {err}") from None
                folder = scratch_dirs.setdefault(_scratch_id(base), out / "scratch" / f"{_slug(values)}-s{seed}")
                scratch = base.replace(name=f"{spec.name}/scratch", out=str(folder))
            runs.append(PlannedRun(label, values, seed, cfg, scratch))
    return runs


def run_state(cfg: ExperimentConfig) -> str:
    """``"done"`` (finished, same config), ``"new"``, ``"interrupted"`` (started, no summary).

    Raises
    ------
    StudyError
        If the folder holds a run of another config.
    """
    out = Path(cfg.out)
    if not holds_run(out):
        return "new"
    held = (out / CONFIG_FILE).read_text() if (out / CONFIG_FILE).is_file() else ""
    if held != cfg.to_toml():
        raise StudyError(f"{out} holds a run of another config (was the study file changed?): rerun the study with "
                         "--overwrite to replace its runs, or give it another folder (--out)")
    return "done" if (out / SUMMARY_FILE).is_file() else "interrupted"


def resumable(cfg: ExperimentConfig) -> int | None:
    """The round after which an interrupted run can continue from its checkpoint, or ``None`` (start again)."""
    from fedtl.server.checkpoint import read_resume  # imports torch, as the next does Flower
    from fedtl.simulations.node_state import check_resumable

    try:
        done = read_resume(Path(cfg.out)).round
        check_resumable(cfg)
    except RunFolderError:
        return None
    return done


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def run_study(
    spec: StudySpec, out: Path, *, command: str, overwrite: bool = False, console: Console | None = None,
    simulate: Callable[..., dict[str, Any]] | None = None,
) -> list[PlannedRun]:
    """Run every run of ``spec`` not already finished in ``out``, then write its plan.

    Parameters
    ----------
    spec : StudySpec
        The study.
    out : Path
        The study folder.
    command : str
        The command that started the study (recorded for the report).
    overwrite : bool, default False
        Rerun every run, replacing what the folder holds.
    console : Console, optional
        Where the study's progress lines go.
    simulate : callable, optional
        ``simulate(cfg, overwrite=...)``; default the Ray simulation.
    """
    if simulate is None:
        from fedtl.simulations.simulate import simulate
    console = console or Console()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file, not a folder: name a folder for the study (it is created if missing)")
    runs = plan_study(spec, out)
    jobs: list[ExperimentConfig] = []
    for run in runs:
        jobs.extend(c for c in (run.cfg, run.scratch) if c is not None and c not in jobs)
    for cfg in jobs:  # every data split too, before the first run: a bad alpha fails here, not midway
        check_partitions(cfg.data, cfg.clients, cfg.seed)
    states = {id(c): ("new" if overwrite else run_state(c)) for c in jobs}  # refuses conflicts before any run
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_FILE).write_text(spec.text)
    write_plan(out, spec, runs, command)
    todo = [c for c in jobs if states[id(c)] != "done"]
    console.print(f"[bold]study {spec.name}[/]: {len(runs)} runs ({len(jobs)} with baselines), "
                  f"{len(jobs) - len(todo)} already done -> {out}")
    for label, reason in runs.skipped:
        console.print(f"[yellow]skipped[/] {label}: {reason}")
    t0 = time.perf_counter()
    with kept_warm():  # one Ray instance and one pool of actors for every run of the study
        for i, cfg in enumerate(todo):
            eta = f" · study ETA {_eta((time.perf_counter() - t0) / i * (len(todo) - i))}" if i else ""
            console.rule(f"[{i + 1}/{len(todo)}] {cfg.name} seed {cfg.seed}{eta}")
            run_or_resume(cfg, states[id(cfg)], simulate, overwrite=overwrite, console=console)
    return runs


def run_or_resume(cfg: ExperimentConfig, state: str, simulate: Callable[..., dict[str, Any]], *, overwrite: bool,
                  console: Console) -> None:
    """Run ``cfg`` as its folder's ``state`` (``run_state``) asks: an interrupted run continues from its checkpoint,
    or starts again where it has none; a new one starts (``overwrite``: whatever the folder holds)."""
    done = resumable(cfg) if state == "interrupted" else None
    if done is not None:
        console.print(f"resuming after round {done}, from its checkpoint")
    simulate(cfg, overwrite=overwrite or (state == "interrupted" and done is None), resume=done is not None)


def write_plan(out: Path, spec: StudySpec, runs: StudyPlan, command: str) -> Path:
    """``plan.json``: the study's runs, axes, seeds and the command that made it."""
    plan = {
        "name": spec.name, "command": command, "axes": [k for k, _ in spec.axes], "seeds": list(spec.seeds),
        PLAN_TARGET_ACCURACY: spec.target_accuracy,
        "runs": [{"label": r.label, "values": r.values, "seed": r.seed, "dir": str(Path(r.cfg.out).relative_to(out)),
                  PLAN_SCRATCH_DIR: str(Path(r.scratch.out).relative_to(out)) if r.scratch else None} for r in runs],
    }
    plan["skipped"] = [{"label": label, "reason": reason} for label, reason in runs.skipped]
    path = out / PLAN_FILE
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path
