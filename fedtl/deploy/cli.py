"""``fedtl deploy``: run a federation on real machines with Flower's deployment runtime.

Each command prints the Flower command it runs, so that nothing is hidden and a user
can run Flower's own tools instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from fedtl.deploy.commands import (
    COMPLETED,
    CONTROL_PORT,
    INSECURE_WARNING,
    Keys,
    register_command,
    run_command,
    run_status,
    save_connection,
    started_run,
    status_command,
    superlink_command,
    supernode_command,
)
from fedtl.deploy.gateway import FLEET, MAX_BODY, run_behind_gateway
from fedtl.protocol import NUM_PARTITIONS, PARTITION_ID

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Deploy on real machines: a SuperLink with TLS and node authentication, SuperNodes that "
                       "each read only their own data, and `flwr run`.")
console = Console(soft_wrap=True)  # paths and commands unbroken, to copy

CertsOpt = Annotated[Path, typer.Option("--certs", help="The folder `fedtl deploy certs` wrote.")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="No TLS and no node authentication (one machine, "
                                                              "a first try only).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the command, do not run it.")]


def _fail(err: Exception | str) -> NoReturn:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(2)


def _tool(name: str) -> str:
    # Flower's tools sit beside this interpreter when fedtl runs from a venv that is not on PATH.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        _fail(f"{name} not found: install fedtl (it brings flwr) into this environment")
    return found


def shown(cmd: list[str]) -> str:
    """``cmd`` as a shell line to copy: ``shlex.join``, but an argument holding single quotes (a node config's
    TOML strings) goes in double quotes rather than shlex's ``'"'"'`` splices, where the shell allows it."""
    def word(arg: str) -> str:
        plain = shlex.quote(arg)
        return f'"{arg}"' if "'" in arg and not any(c in arg for c in '"$`\\!') else plain
    return " ".join(word(a) for a in cmd)


def _show(cmd: list[str], insecure: bool) -> None:
    if insecure:
        console.print(f"[bold yellow]warning:[/] {INSECURE_WARNING}")
    typer.echo(shown(cmd))  # unwrapped: a line to copy


def _exec(cmd: list[str], dry_run: bool, insecure: bool) -> None:
    _show(cmd, insecure)
    if dry_run:
        return
    sys.stdout.flush()
    os.execv(_tool(cmd[0]), [cmd[0], *cmd[1:]])  # Flower's process takes this one's place (and its signals)


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder to write into.")] = Path("certs"),
    nodes: Annotated[int, typer.Option("--nodes", help="Key pairs for node0 .. node<N-1>.")] = 0,
    node: Annotated[list[str] | None, typer.Option("--node", help="A node key pair by name (repeatable).")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="A name or IP the SuperLink is reached at, "
                                                                  "besides loopback (repeatable).")] = None,
    days: Annotated[int, typer.Option("--days", help="Validity of the certificates.")] = 365,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing CA.")] = False,
) -> None:
    """Make a test federation's CA, SuperLink certificate and SuperNode key pairs."""
    from fedtl.deploy.certs import make_federation_keys

    names = [*(f"node{i}" for i in range(nodes)), *(node or [])]
    try:
        keys = make_federation_keys(out, nodes=names, hosts=tuple(host or ()), days=days, overwrite=overwrite)
    except (ValueError, OSError) as err:  # an existing CA, a bad host name or node name, --days < 1
        _fail(err)
    console.print(f"CA: {keys.ca} (its key {keys.ca_key}: keep it safe; whoever holds it can make certificates "
                  "the nodes trust)")
    console.print(f"SuperLink: {keys.server_cert}, {keys.server_key}")
    for name in names:
        console.print(f"{name}: {keys.node_key(name)} (copy to its machine only), {keys.node_public_key(name)} "
                      "(register it)")


@app.command()
def connection(
    name: Annotated[str, typer.Argument(help="The connection's name (what `flwr run . <name>` uses).")],
    address: Annotated[str, typer.Option("--address", help="host:port of the SuperLink.")],
    certs_: CertsOpt = Path("certs"),
    insecure: InsecureOpt = False,
) -> None:
    """Save a SuperLink connection in $FLWR_HOME/config.toml (TLS: trusting the federation's CA)."""
    if insecure:
        console.print(f"[bold yellow]warning:[/] {INSECURE_WARNING}")
    try:
        save_connection(name, address, Keys(certs_), insecure=insecure)
    except FileNotFoundError as err:
        _fail(err)
    home = os.environ.get("FLWR_HOME", "~/.flwr")
    console.print(f"connection {name!r} -> {address} saved in {home}/config.toml")


@app.command()
def superlink(
    certs_: CertsOpt = Path("certs"),
    host: Annotated[str, typer.Option("--host", help="Address the nodes reach (default: this machine only; the "
                                                    "federation network's address for other machines).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port the nodes reach: the Fleet API, nothing else.")] = 8000,
    control_port: Annotated[int, typer.Option("--control-port", help="The SuperLink's own port, on loopback only: "
                                              "flwr run and fedtl deploy register use it.")] = CONTROL_PORT,
    max_request_mb: Annotated[float, typer.Option("--max-request-mb", help="Refuse a node's request body over "
                                                  "this (Flower sends arrays in 5 MiB pieces).")] = MAX_BODY / 2**20,
    database: Annotated[str | None, typer.Option("--database", help="Keep state in this file (default: memory).")] = None,
    insecure: InsecureOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Start the SuperLink on loopback and, in front of it on --host:--port, the gateway that lets
    SuperNodes reach its Fleet API alone: TLS, and only registered SuperNodes may join."""
    if port == control_port:
        _fail(f"--port and --control-port are both {port}: the nodes' port and the SuperLink's own must differ")
    keys = Keys(certs_)
    try:
        cmd = superlink_command(keys, port=control_port, insecure=insecure, database=database)
    except FileNotFoundError as err:
        _fail(err)
    _show(cmd, insecure)
    scheme = "http" if insecure else "https"
    typer.echo(f"fedtl's Fleet gateway: {scheme}://{host}:{port}{FLEET} -> 127.0.0.1:{control_port} "
               f"(nothing else; request bodies up to {max_request_mb:g} MiB)")
    if dry_run:
        return
    sys.stdout.flush()
    code = run_behind_gateway([_tool(cmd[0]), *cmd[1:]], control_port=control_port, host=host, port=port,
                              keys=None if insecure else keys, max_body=int(max_request_mb * 2**20))
    raise typer.Exit(code)


@app.command()
def register(
    names: Annotated[list[str], typer.Argument(help="Node names whose public keys to register.")],
    connection_: Annotated[str, typer.Option("--connection", help="The SuperLink connection.")] = "deploy",
    certs_: CertsOpt = Path("certs"),
) -> None:
    """Register SuperNodes' public keys with the SuperLink (only registered nodes may join)."""
    for name in names:
        try:
            cmd = register_command(Keys(certs_), name, connection_)
        except FileNotFoundError as err:
            _fail(err)
        typer.echo(shown(cmd))
        done = subprocess.run([_tool(cmd[0]), *cmd[1:]], check=False)
        if done.returncode:
            raise typer.Exit(done.returncode)


@app.command()
def supernode(
    name: Annotated[str, typer.Argument(help="This node's name (its key file in <certs>/nodes/).")],
    superlink_: Annotated[str, typer.Option("--superlink", help="host:port of the SuperLink.")],
    data_path: Annotated[str | None, typer.Option("--data-path", help="This node's own data: an image folder or "
                                                                      ".npz (node config data-path).")] = None,
    port: Annotated[int, typer.Option("--port", help="Its local Runtime API port, which its ClientApps connect "
                                                    "to (one per SuperNode on a machine).")] = 9094,
    node_config: Annotated[list[str] | None, typer.Option(
        "--node-config", help="More node config, as Flower's --node-config takes it (repeatable): held-out=true, "
        "device=\"cpu\", threads=4, or \"partition-id=0 num-partitions=3\" for a dry run on a built-in "
        "scenario.")] = None,
    certs_: CertsOpt = Path("certs"),
    insecure: InsecureOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Start a SuperNode that reads only its own data and authenticates with its own key."""
    import click
    from flwr.common.config import parse_config_args

    items = node_config or []
    bad = [item for item in items if "=" not in item]
    if bad:
        _fail(f"--node-config {bad[0]!r} is not key=value")
    try:
        extra = parse_config_args([" ".join(items)]) if items else {}  # exactly as flower-supernode reads it
    except click.ClickException as err:
        _fail(f"--node-config {' '.join(items)!r}: {err.message}")
    if data_path is None and PARTITION_ID not in extra:
        _fail("a SuperNode needs its data: --data-path /its/data (or, for a dry run on a built-in scenario, "
              f"--node-config {PARTITION_ID}=<i> --node-config {NUM_PARTITIONS}=<n>)")
    if data_path is not None and not Path(data_path).exists():
        console.print(f"[bold yellow]warning:[/] {data_path} does not exist (yet): every round will fail on this "
                      "node until it does")
    try:
        # Absolute: Flower starts the ClientApp in a process of its own, whose working folder may differ.
        data_path = str(Path(data_path).resolve()) if data_path is not None else None
        cmd = supernode_command(Keys(certs_), name, superlink=superlink_, data_path=data_path, port=port,
                                insecure=insecure, extra=extra)
    except (FileNotFoundError, ValueError) as err:
        _fail(err)
    _exec(cmd, dry_run, insecure)


@app.command("export-data")
def export_data(
    out: Annotated[Path, typer.Option("--out", help="Folder for one data folder per node.")] = Path("nodes"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key.")] = None,
) -> None:
    """A dry run's node data: each partition of a built-in scenario written as node-<i>/{train,test}/<class>/."""
    from fedtl.config import load_config
    from fedtl.data.export import export_partitions
    from fedtl.errors import FedtlError

    try:
        cfg = load_config(config, set_ or [])
        folders = export_partitions(cfg, out)
    except (FedtlError, FileExistsError) as err:
        _fail(err)
    for i, folder in enumerate(folders):
        console.print(f"partition {i}: {folder}")


@app.command()
def run(
    connection_: Annotated[str, typer.Option("--connection", help="The SuperLink connection.")] = "deploy",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run folder, a path on the SuperLink's machine "
                                                               "(default: runs/<name>-<time> there).")] = None,
    app_dir: Annotated[Path, typer.Option("--app", help="fedtl's project folder (its pyproject.toml).")] = Path("."),
) -> None:
    """Run the federation: `flwr run <app> <connection> --stream` with the resolved config."""
    from fedtl.config import load_config
    from fedtl.errors import FedtlError

    try:
        # Paths stay as written: the SuperLink's and each SuperNode's machine read them from its own
        # working folder (pre-trained weights in its .fedtl-cache/), not this machine's.
        cfg = load_config(config, set_ or [], resolve_paths=False)
    except FedtlError as err:
        _fail(err)
    if out is not None:
        cfg = cfg.replace(out=out)
    if not (app_dir / "pyproject.toml").is_file():
        _fail(f"{app_dir} has no pyproject.toml: run from fedtl's project folder or pass --app")
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "run-config.toml"
        file.write_text(cfg.to_toml())
        cmd = run_command(connection_, file, app_dir)
        typer.echo(shown(cmd))
        sys.stdout.flush()
        # Flower's output passes through line by line, read for the run's ID on the way.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen([_tool(cmd[0]), *cmd[1:]], stdout=subprocess.PIPE, text=True, env=env) as proc:
            run_id = None
            for line in proc.stdout or ():
                sys.stdout.write(line)
                sys.stdout.flush()
                run_id = run_id or started_run(line)
        if proc.returncode or run_id is None:
            raise typer.Exit(proc.returncode)
    _check_ended(connection_, run_id, cfg.out)


def _check_ended(connection: str, run_id: int, out: str) -> None:
    """Exit 1, saying so, unless run ``run_id`` completed: ``flwr run --stream`` exits 0 after a failed ServerApp."""
    cmd = status_command(connection, run_id)
    listed = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, check=False)
    status, details = run_status(listed.stdout, run_id)
    if status == COMPLETED:
        return
    where = out or "runs/<name>-<time>"
    console.print(f"[bold red]error:[/] run {run_id} ended {status}{f' ({details})' if details else ''}: the "
                  f"ServerApp's log above says why; what it recorded, if it got that far, is in {where} on the "
                  "SuperLink's machine", soft_wrap=True)
    raise typer.Exit(1)
