"""The Flower commands of a deployment, with fedtl's defaults: TLS on, node authentication on.

Each function returns an argv list; ``fedtl deploy ...`` prints it and runs it, and a user
can copy it instead. ``insecure = True`` turns TLS (and so node authentication, which
needs it) off: for a first try on one machine only, and never without saying so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedtl.deploy.certs import Keys
from fedtl.protocol import DATA_PATH

INSECURE_WARNING = ("TLS is OFF (--insecure): every model update and the node keys' challenges cross the network "
                    "in clear, and nodes cannot be authenticated. Use it on one machine, for a first try only")


def _toml_value(v: str | bool | int | float) -> str:
    # Flower reads each value with TOML after splitting on a regex that takes '...' or "..." whole and
    # allows no quote inside either: a literal string ('...', no escapes) unless the value holds a "'".
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int | float):
        return repr(v)
    if "'" not in v and "\n" not in v:
        return f"'{v}'"
    if '"' not in v:
        return json.dumps(v, ensure_ascii=False)
    raise ValueError(f"node config value {v!r} holds both quote characters, which Flower's --node-config cannot "
                     "carry: rename the path")


def _node_config(values: dict[str, str | bool | int | float]) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


CONTROL_PORT = 9093  # Flower's former Control API port; here the SuperLink's own, on loopback


def superlink_command(keys: Keys, *, port: int = CONTROL_PORT, insecure: bool = False,
                      database: str | None = None) -> list[str]:
    """``flower-superlink`` serving the Fleet, Control and Runtime APIs on ``127.0.0.1:port``.

    Flower 1.42 serves all three on one port, and the Control API authenticates no account: the
    SuperLink stays on loopback (``flwr run`` and ``flwr supernode register`` on its machine reach
    it there) and ``fedtl.deploy.gateway`` lets the nodes in, to the Fleet API alone.

    Parameters
    ----------
    keys : Keys
        The federation's files (the SuperLink needs ``ca.crt``, ``server.pem`` and ``server.key``).
    port : int, optional
        Its one port, on loopback (default 9093).
    insecure : bool, optional
        No TLS and no node authentication (``INSECURE_WARNING``).
    database : str, optional
        A file to keep the SuperLink's state in across restarts (default: memory).

    Raises
    ------
    FileNotFoundError
        If a TLS file is missing (with the command that makes it).
    """
    cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    if database:
        cmd += ["--database", database]
    if insecure:
        return [*cmd, "--insecure"]
    keys.check(keys.ca, keys.server_cert, keys.server_key)
    return [*cmd, "--ssl-ca-certfile", str(keys.ca), "--ssl-certfile", str(keys.server_cert),
            "--ssl-keyfile", str(keys.server_key), "--enable-supernode-auth"]


def supernode_command(keys: Keys, name: str, *, superlink: str, data_path: str | None = None, port: int = 9094,
                      insecure: bool = False, extra: dict[str, str | bool | int] | None = None,
                      max_retries: int | None = None) -> list[str]:
    """``flower-supernode`` ``name`` connecting to ``superlink`` (host:port), its own data at ``data_path``.

    Parameters
    ----------
    keys : Keys
        The federation's files (this node needs ``ca.crt`` and its own private key).
    name : str
        The node's name (its key file's name).
    superlink : str
        ``host:port`` of the SuperLink.
    data_path : str, optional
        Its data (an image folder or ``.npz``); the node config's ``data-path``.
    port : int
        Its local Runtime API port, which its ClientApps connect to; each SuperNode on one machine needs
        its own (default 9094).
    insecure : bool
        No TLS, no node key (``INSECURE_WARNING``).
    extra : dict, optional
        More node config (``partition-id``/``num-partitions`` for a dry run, ``held-out``, ``device``).
    max_retries : int, optional
        Give up connecting after this many tries (default: Flower's, retry forever).
    """
    config = {**({DATA_PATH: data_path} if data_path else {}), **(extra or {})}
    cmd = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    if config:
        cmd += ["--node-config", _node_config(config)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if insecure:
        return [*cmd, "--insecure"]
    keys.check(keys.ca, keys.node_key(name))
    return [*cmd, "--root-certificates", str(keys.ca), "--auth-supernode-private-key", str(keys.node_key(name))]


def register_command(keys: Keys, name: str, connection: str) -> list[str]:
    """``flwr supernode register``: let node ``name``'s key join the federation behind ``connection``.

    Raises
    ------
    FileNotFoundError
        If ``nodes/<name>.pub`` is missing.
    """
    keys.check(keys.node_public_key(name))
    return ["flwr", "supernode", "register", str(keys.node_public_key(name)), connection, "--name", name]


def run_command(connection: str, run_config: Path, app: Path = Path(".")) -> list[str]:
    """``flwr run``: the app at ``app`` (fedtl's checkout) on ``connection`` with the config file ``run_config``."""
    return ["flwr", "run", str(app), connection, "--stream", "--run-config", str(run_config)]


# What `flwr run` prints once the SuperLink has accepted the run (flwr/cli/run/run.py).
_STARTED = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"


def started_run(line: str) -> int | None:
    """The run ID in a line of ``flwr run``'s output, if it is the line that announces the run."""
    found = _STARTED.search(line)
    return int(found.group(1)) if found else None


def status_command(connection: str, run_id: int) -> list[str]:
    """``flwr ls``: one run's status, as JSON."""
    return ["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"]


def run_status(ls_json: str, run_id: int) -> tuple[str, str]:
    """``(status, details)`` of run ``run_id`` in ``flwr ls --format json``'s output, e.g.
    ``("finished:failed", "")``; ``("unknown", why)`` when the output does not hold it.

    ``flwr run --stream`` exits 0 whatever the ServerApp did (Flower 1.42): the status is how a caller
    tells a run that completed from one whose ServerApp raised (``finished:failed``) or was stopped."""
    try:
        runs = json.loads(ls_json)["runs"]
    except (ValueError, KeyError, TypeError):
        return "unknown", f"flwr ls printed no run list: {ls_json.strip()[-300:]!r}"
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown")), str(run.get("status-details") or "")
    return "unknown", f"flwr ls does not list run {run_id}"


def save_connection(name: str, address: str, keys: Keys, *, insecure: bool = False) -> None:
    """Add (or replace) SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``, with Flower's own writer.

    The connection trusts the federation's CA; it is what ``flwr run . <name>`` and
    ``flwr supernode register ... <name>`` connect with.

    Parameters
    ----------
    name : str
        The connection's name.
    address : str
        ``host:port`` of the SuperLink.
    keys : Keys
        The federation's files (``ca.crt``).
    insecure : bool, optional
        A connection without TLS.

    Raises
    ------
    FileNotFoundError
        If ``ca.crt`` is missing.
    """
    # lazily: the fedtl command imports this module at start, and a mistyped config must fail before Flower loads
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    if insecure:
        write_superlink_connection(SuperLinkConnection(name, address=address, insecure=True))
        return
    keys.check(keys.ca)
    write_superlink_connection(SuperLinkConnection(name, address=address,
                                                   root_certificates=str(keys.ca.resolve())))
