"""The ``fedtl`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedtl.config import ExperimentConfig, all_keys, flwr_app_config_table, load_config
from fedtl.errors import ConfigError, FedtlError
from fedtl.run_folder import (
    BEST_ACCURACY,
    BYTES_DOWN_TOTAL,
    BYTES_UP_TOTAL,
    CONFIG_FILE,
    FINAL_ACCURACY,
    OUT_DIR,
    PER_CLIENT,
    PER_CLIENT_ACCURACY_MEAN,
    PER_CLIENT_PERSONAL_MEAN,
    SCRATCH_FINAL_ACCURACY,
    STOPPED_EARLY,
    TOTAL_PARAMS,
    TRANSFER_GAIN,
    TRAVELLING_PARAMS,
    TRAVELLING_RATIO,
    WALL_SECONDS,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated transfer learning on Flower.")
# soft_wrap: long lines (paths, the guarantee) are never broken by rich; the terminal wraps them.
console = Console(soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (default: the built-in default study).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: --set rounds=20 --set finetune.mode=full.")]
# Errors a user can fix from the command line, or a run that could not go on: one message,
# not a traceback (the run folder keeps the rounds already done).
_USER_ERRORS = (FedtlError, FileExistsError)


def _load(config: Path | None, sets: list[str] | None, out: Path | None = None) -> ExperimentConfig:
    cfg = load_config(config, sets or [])
    return cfg.replace(out=str(out)) if out is not None else cfg


def _fail(err: Exception) -> NoReturn:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(2)


def _table(title: str, header: list[str], rows: list[list[str]], *, markdown: bool = False) -> None:
    """A table: drawn by rich on a terminal, as a whole Markdown table otherwise (a pipe, a file,
    ``--markdown``), so that no cell is ever cut to fit a width."""
    if markdown or not console.is_terminal:
        from fedtl.reports.results import markdown_table

        typer.echo((f"**{title}**\n\n" if title else "") + markdown_table(header, rows))
        return
    table = Table(*header, title=title, box=box.SIMPLE_HEAD)
    for r in rows:
        table.add_row(*r)
    console.print(table)


@app.command()
def simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    compare_scratch: Annotated[bool, typer.Option("--compare-scratch", help="Also run the from-scratch baseline and report the transfer gain.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/<name>-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs live (by default they "
                                                              "go to <run>/flower.log).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Run on an existing Ray cluster: 'auto' (started here with `ray start --head`) or "
        "host:port of its head (simulation.ray-address).")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue the run in this folder from its last checkpoint (its own config.toml; no "
        "--config, --set or --out).")] = None,
) -> None:
    """Run a federated fine-tuning simulation on Ray."""
    try:  # the config first: a mistake is reported before torch, Flower and Ray are imported
        if resume is not None:
            if config or set_ or out or compare_scratch or overwrite or ray_address:
                raise ConfigError("--resume continues a run with its own config.toml: pass no --config, --set, --out, "
                                  "--ray-address, --compare-scratch or --overwrite with it")
            if not (resume / CONFIG_FILE).is_file():
                raise ConfigError(f"--resume {resume}: no {CONFIG_FILE} there; name the folder of a run")
            cfg = _load(resume / CONFIG_FILE, [], None)
        else:
            cfg = _load(config, [*(set_ or []), *([f"simulation.ray-address={ray_address!r}"] if ray_address else [])],
                        out)
        from fedtl.simulations.simulate import simulate as run
        from fedtl.simulations.simulate import simulate_with_scratch

        summary = (simulate_with_scratch(cfg, overwrite=overwrite, verbose=verbose) if compare_scratch
                   else run(cfg, overwrite=overwrite, verbose=verbose, resume=resume is not None))
    except _USER_ERRORS as err:
        _fail(err)
    pairs = [(key, summary[key]) for key in (
        FINAL_ACCURACY, BEST_ACCURACY, SCRATCH_FINAL_ACCURACY, TRANSFER_GAIN, BYTES_DOWN_TOTAL,
        BYTES_UP_TOTAL, TRAVELLING_PARAMS, TOTAL_PARAMS, TRAVELLING_RATIO, WALL_SECONDS) if key in summary]
    pairs += [(f"client {key.replace('_', ' ')}", summary[PER_CLIENT][key])
              for key in (PER_CLIENT_ACCURACY_MEAN, PER_CLIENT_PERSONAL_MEAN) if key in summary.get(PER_CLIENT, {})]
    cells = [(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in pairs]
    # Two figures a row: the summary stays short enough to read under the round tables.
    rows = [[*cells[i], *(cells[i + 1] if i + 1 < len(cells) else ("", ""))] for i in range(0, len(cells), 2)]
    _table(f"{summary['name']}: {summary['mode']} ({summary['init']})", ["summary", "value", "summary", "value"], rows)
    console.print(f"privacy: {summary['privacy']['guarantee']}")
    if summary.get(STOPPED_EARLY):
        console.print(f"[yellow]{summary[STOPPED_EARLY]}[/]")
    console.print(f"run folder: {summary[OUT_DIR]}", soft_wrap=True)


@app.command()
def pretrain(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Pre-train the backbone on the scenario's source data (cached; a no-op when cached)."""
    from fedtl.models.pretrain import ensure_pretrained, pretrained_path, pretrains_itself

    try:
        cfg = _load(config, set_)
        if not pretrains_itself(cfg.replace(init="pretrained")):
            console.print("nothing to pre-train: the backbone's weights come from "
                          f"{cfg.model.weights_path or cfg.model.weights or 'its package'}")
            return
        cached = pretrained_path(cfg).is_file()
        path = ensure_pretrained(cfg)
    except _USER_ERRORS as err:
        _fail(err)
    console.print(f"{'cached' if cached else 'pre-trained'}: {path}", soft_wrap=True)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    flwr_table: Annotated[bool, typer.Option("--flwr-table", help="Print pyproject's [tool.flwr.app.config] table.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the configuration reference (docs/config.md).")] = False,
) -> None:
    """Print the resolved config as TOML (or, with no file, the defaults and every key)."""
    if markdown:
        from fedtl.config.reference import markdown as reference

        typer.echo(reference(), nl=False)
        return
    if flwr_table:
        console.print(flwr_app_config_table(), markup=False, highlight=False)
        return
    try:
        cfg = _load(config, set_)
    except _USER_ERRORS as err:
        _fail(err)
    console.print(cfg.to_toml(), markup=False, highlight=False)
    if config is None and not set_:
        console.print(f"# keys: {', '.join(all_keys())}", markup=False, highlight=False)


@app.command()
def study(
    study_file: Annotated[Path, typer.Argument(help="A study file: base config, grid and seeds (experiments/*.toml).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Study folder (default: the file's out, or runs/study-<name>).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rerun every run, replacing those in the folder.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs live (by default "
                                                              "each run's go to its flower.log).")] = False,
) -> None:
    """Run a study (every grid point x seed, resumable), then write its report."""
    import functools
    import shlex
    import sys

    from fedtl.simulations.study import load_study, run_study

    try:
        spec = load_study(study_file)
        folder = out or Path(spec.out)
        from fedtl.simulations.simulate import simulate as run  # after the study file is checked

        run_study(spec, folder, command="fedtl " + shlex.join(sys.argv[1:]), overwrite=overwrite, console=console,
                  simulate=functools.partial(run, verbose=verbose))
    except _USER_ERRORS as err:
        _fail(err)
    report(folder)


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="A study folder (what `fedtl study` wrote).")],
) -> None:
    """Rebuild a study's report (HTML, CSV, Markdown) from its saved runs."""
    from fedtl.reports.report import build_report

    try:
        page = build_report(study_dir)
    except _USER_ERRORS as err:
        _fail(err)
    console.print(f"report: {page}", soft_wrap=True)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="A run folder.")],
    run_b: Annotated[Path, typer.Argument(help="Another run folder.")],
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write both accuracy curves to this PNG.")] = None,
) -> None:
    """Two runs side by side: summary figures and their difference."""
    from fedtl.reports.plots import plot_accuracy
    from fedtl.reports.results import compare_runs
    from fedtl.reports.runs import read_metrics

    try:
        header, rows = compare_runs(run_a, run_b)
    except _USER_ERRORS as err:
        _fail(err)
    _table("fedtl compare", list(header), [list(r) for r in rows])
    if plot is not None:
        plot_accuracy({str(run_a): read_metrics(run_a), str(run_b): read_metrics(run_b)}, plot, title="compare")
        console.print(f"plot: {plot}")


@app.command()
def audit(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    epsilons: Annotated[str, typer.Option("--epsilons", help="Target epsilons, one run each; inf: without DP.")] = "1,3,8,inf",
    canaries: Annotated[int, typer.Option("--canaries", help="Canaries drawn (each planted with probability 1/2).")] = 200,
    guesses: Annotated[int, typer.Option("--guesses", help="Coins guessed (half planted, half not), fixed in advance.")] = 40,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Audit folder (default: runs/audit-<name>).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Draw new canaries and rerun every level.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs live.")] = False,
) -> None:
    """Audit privacy empirically: plant canaries in one client, run at each epsilon, and bound epsilon from below.

    Exits with status 1 when a lower bound passes the accounted epsilon (a leak, or the 5% false alarm)."""
    import functools

    try:
        cfg = _load(config, set_)  # the config first, before torch, Flower and Ray are imported
        from fedtl.simulations.audit import AuditSpec, parse_epsilons, run_audit

        spec = AuditSpec(parse_epsilons(epsilons), canaries=canaries, guesses=guesses)
        from fedtl.reports.audit import audit_table
        from fedtl.simulations.simulate import simulate as run

        folder = (out or Path("runs") / f"audit-{cfg.name}").resolve()
        result = run_audit(cfg, spec, folder, overwrite=overwrite, console=console,
                           simulate=functools.partial(run, verbose=verbose))
    except _USER_ERRORS as err:
        _fail(err)
    header, rows = audit_table(result["levels"])
    _table(f"privacy audit: {cfg.name} (client {cfg.data.canary_client}, {canaries} canaries, {guesses} guesses)",
           header, rows)
    console.print(f"audit folder: {folder}", soft_wrap=True)
    refuted = [r["epsilon"] for r in result["levels"] if r["refuted"]]
    if refuted:
        console.print(f"[bold red]the audit's lower bound passes the accounted epsilon at target {', '.join(refuted)}[/]"
                      ": a privacy leak, or the 5% chance of a false alarm; see audit.md")
        raise typer.Exit(1)


@app.command()
def backbones(
    image_size: Annotated[int, typer.Option("--image-size", help="Input side (ViT needs a multiple of 16).")] = 32,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
) -> None:
    """Every backbone: its blocks, parameters, and what travels per fine-tuning mode (hf-text depends on its
    model directory; minilm is listed when its package is installed)."""
    from fedtl.models.backbones import BACKBONES
    from fedtl.models.inventory import TABLE_MODES, inventory

    rows = []
    for name in BACKBONES.names():
        try:
            rows += inventory([name], image_size)
        except ConfigError as err:  # hf-text without a directory, minilm without its package
            typer.echo(f"{name}: {err}", err=True)
    header = ["backbone", "blocks", "params", *TABLE_MODES]
    cells = [[str(r["backbone"]), ", ".join(r["blocks"]) if len(r["blocks"]) <= 8 else
              f"{r['blocks'][0]}, {r['blocks'][1]}, ..., {r['blocks'][-1]} ({len(r['blocks'])})",
              f"{r['params']:,}", *(f"{r[m]:,}" for m in TABLE_MODES)] for r in rows]
    _table("" if markdown else f"backbones at {image_size} px, 10 classes: elements that travel in round 1", header,
           cells, markdown=markdown)


from fedtl.deploy.cli import app as deploy_app  # noqa: E402 - after the commands it follows in --help

app.add_typer(deploy_app, name="deploy")


def main() -> None:
    """Entry point of the ``fedtl`` script."""
    app()


if __name__ == "__main__":
    main()
