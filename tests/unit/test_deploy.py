"""Deployment pieces that need no running federation: key material, Flower commands, the connection file."""

from __future__ import annotations

import ipaddress
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
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.5")}
    server_key = load_pem_private_key(keys.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    for name, (private, public) in keys.nodes.items():
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
    assert link[:5] == ["flower-superlink", "--host", "0.0.0.0", "--port", "8123"]
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
