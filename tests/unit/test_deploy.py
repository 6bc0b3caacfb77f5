"""Deployment pieces that need no running federation: key material, Flower commands, the connection file."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from fedtl.deploy.certs import make_federation_keys
from fedtl.deploy.commands import Keys, register_command, save_connection, superlink_command, supernode_command


def test_certificates_chain_to_the_ca_and_name_every_host(tmp_path: Path) -> None:
    keys = make_federation_keys(tmp_path, nodes=["a", "b"], hosts=("10.0.0.5", "link.example"))
    ca = x509.load_pem_x509_certificate(keys.ca.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.5")}
    server_key = load_pem_private_key(keys.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    for name, private, public in ((n, keys.node_key(n), keys.node_public_key(n)) for n in ("a", "b")):
        key = load_ssh_private_key(private.read_bytes(), None)  # the format Flower's SuperNode reads
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1", name
        assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys.ca_key).st_mode) == 0o600
    with pytest.raises(FileExistsError, match="locked out by a new CA"):
        make_federation_keys(tmp_path, nodes=[])


def test_commands_have_tls_and_node_auth_unless_insecure(tmp_path: Path) -> None:
    make_federation_keys(tmp_path, nodes=["n0"])
    keys = Keys(tmp_path)
    link = superlink_command(keys, port=8123)
    assert link[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "8123"]  # loopback: the gateway is the door
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert link[link.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    node = supernode_command(keys, "n0", superlink="10.1.2.3:8123", data_path="/data/my silo",
                             extra={"held-out": True, "device": "cpu"})
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "nodes" / "n0")
    # Flower's own parser reads the node config back as written.
    assert parse_config_args([node[node.index("--node-config") + 1]]) == {
        "data-path": "/data/my silo", "held-out": True, "device": "cpu"}
    insecure = supernode_command(keys, "n0", superlink="h:1", insecure=True)
    assert "--insecure" in insecure and "--root-certificates" not in insecure
    assert "--insecure" in superlink_command(Keys(tmp_path / "none"), insecure=True)  # needs no files
    with pytest.raises(FileNotFoundError, match=r"nodes/n9 is missing: make the federation's keys with `fedtl deploy certs"):
        supernode_command(keys, "n9", superlink="h:1")
    assert register_command(keys, "n0", "prod")[:4] == ["flwr", "supernode", "register", str(tmp_path / "nodes" / "n0.pub")]


def test_a_saved_connection_is_what_flower_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    make_federation_keys(tmp_path / "certs", nodes=[])
    save_connection("prod", "10.0.0.5:8000", Keys(tmp_path / "certs"))
    conn = read_superlink_connection("prod")
    assert conn.address == "10.0.0.5:8000" and conn.root_certificates == str((tmp_path / "certs" / "ca.crt").resolve())
    assert not conn.insecure
    save_connection("try", "127.0.0.1:8000", Keys(tmp_path / "none"), insecure=True)
    assert read_superlink_connection("try").insecure
    assert "[tool.flwr.federations]" not in (tmp_path / "home" / "config.toml").read_text()


def test_node_config_values_survive_flowers_parser() -> None:
    from fedtl.deploy.commands import _node_config

    values = {"data-path": "/data/my silo/ünï", "other": "it's here", "held-out": False, "threads": 4, "x": 0.5}
    assert parse_config_args([_node_config(values)]) == values
    with pytest.raises(ValueError, match="both quote characters"):
        _node_config({"data-path": "/a'b\"c"})


def test_certs_refuse_what_would_break_later(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least a day"):
        make_federation_keys(tmp_path / "a", nodes=["n"], days=0)
    with pytest.raises(ValueError, match="cannot be file names"):
        make_federation_keys(tmp_path / "b", nodes=["../n"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing anything
    keys = make_federation_keys(tmp_path / "c", nodes=["n"])
    os.chmod(keys.ca_key, 0o644)
    make_federation_keys(tmp_path / "c", nodes=["n"], overwrite=True)
    assert stat.S_IMODE(os.stat(keys.ca_key).st_mode) == 0o600  # rewritten owner-only, not left as it was


def test_cli_supernode_takes_flowers_node_config_syntax(tmp_path: Path) -> None:
    import shlex

    from typer.testing import CliRunner

    from fedtl.cli import app

    make_federation_keys(tmp_path, nodes=["n0"])
    result = CliRunner().invoke(app, ["deploy", "supernode", "n0", "--superlink", "h:1", "--certs", str(tmp_path),
                                      "--node-config", "partition-id=0 num-partitions=3", "--node-config",
                                      "device='cpu'", "--dry-run"])
    assert result.exit_code == 0, result.output
    cmd = shlex.split(result.output.strip().splitlines()[-1])
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]]) == {
        "partition-id": 0, "num-partitions": 3, "device": "cpu"}
    result = CliRunner().invoke(app, ["deploy", "supernode", "n0", "--superlink", "h:1", "--certs", str(tmp_path),
                                      "--dry-run"])
    assert result.exit_code == 2 and "needs its data: --data-path" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["deploy", "certs", "--out", str(tmp_path / "x"), "--days", "0"])
    assert result.exit_code == 2 and "at least a day" in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)  # one clear error, no traceback


def test_cli_superlink_puts_the_superlink_on_loopback_and_the_gateway_where_nodes_reach(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedtl.cli import app

    make_federation_keys(tmp_path, nodes=[])
    result = CliRunner().invoke(app, ["deploy", "superlink", "--certs", str(tmp_path), "--host", "10.0.0.5",
                                      "--port", "8443", "--max-request-mb", "8", "--dry-run"])
    assert result.exit_code == 0, result.output
    link, gateway = result.output.strip().splitlines()[-2:]
    assert link.startswith("flower-superlink --host 127.0.0.1 --port 9093 ")  # never the nodes' address
    assert gateway == ("fedtl's Fleet gateway: https://10.0.0.5:8443/v1/fleet/ -> 127.0.0.1:9093 (nothing else; "
                       "request bodies up to 8 MiB)")
    result = CliRunner().invoke(app, ["deploy", "superlink", "--certs", str(tmp_path), "--port", "9093", "--dry-run"])
    assert result.exit_code == 2 and "must differ" in result.output


def test_deploy_run_leaves_paths_to_each_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtl.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config(None, [], resolve_paths=False).pretrain.cache_dir == ".fedtl-cache"
    assert load_config(None, []).pretrain.cache_dir == str(tmp_path / ".fedtl-cache")


def test_a_run_is_known_by_its_id_and_ends_by_its_status() -> None:
    from fedtl.deploy.commands import run_status, started_run, status_command

    # What flwr run prints, and flwr ls --format json (the keys of flwr/cli/ls.py's _to_json).
    assert started_run("Successfully started run 4312876512 in federation default\n") == 4312876512
    assert started_run("INFO :      [ROUND 1/2]") is None
    assert status_command("deploy", 7) == ["flwr", "ls", "deploy", "--run-id", "7", "--format", "json"]
    listed = json.dumps({"success": True, "runs": [
        {"run-id": "6", "status": "finished:completed", "status-details": ""},
        {"run-id": "7", "status": "finished:failed", "status-details": "ServerApp raised"}]})
    assert run_status(listed, 7) == ("finished:failed", "ServerApp raised")
    assert run_status(listed, 6) == ("finished:completed", "")
    assert run_status(listed, 8)[0] == "unknown" and "does not list run 8" in run_status(listed, 8)[1]
    assert run_status("Connection refused", 7)[0] == "unknown"
