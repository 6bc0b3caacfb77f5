"""A test federation's key material, made with the ``cryptography`` package.

- a certificate authority (``ca.crt``, ``ca.key``) that signs
- the SuperLink's TLS certificate (``server.pem``, ``server.key``) for its host names and
  addresses (always ``localhost``, ``127.0.0.1`` and ``::1``), and
- one ECDSA P-384 key pair per SuperNode (``nodes/<name>`` in OpenSSH private-key format,
  ``nodes/<name>.pub``), which Flower's node authentication reads.

For a production federation use your organisation's CA; keys never leave the machine
they belong on (a node's private key only its SuperNode's machine, the CA key nobody's).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Keys:
    """Where ``fedtl deploy certs`` put the federation's files (``certs/`` by default)."""

    folder: Path

    @property
    def ca(self) -> Path:
        """The CA certificate every SuperNode and every ``flwr`` connection trusts."""
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.folder / "server.key"

    @property
    def ca_key(self) -> Path:
        """The CA's private key: whoever holds it can make certificates the nodes trust."""
        return self.folder / "ca.key"

    @property
    def nodes(self) -> Path:
        """The folder of the nodes' key pairs."""
        return self.folder / "nodes"

    def node_key(self, name: str) -> Path:
        """Node ``name``'s private key."""
        return self.nodes / name

    def node_public_key(self, name: str) -> Path:
        """Node ``name``'s public key (what the SuperLink registers)."""
        return self.nodes / f"{name}.pub"

    def check(self, *paths: Path) -> None:
        """Raise ``FileNotFoundError`` naming the first missing file and how to make it."""
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: make the federation's keys with `fedtl deploy certs --out "
                                        f"{self.folder}` (and copy each file to the machine that needs it)")


def _private(path: Path, data: bytes) -> None:
    # Owner-only from creation: a key is never world-readable, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file (--overwrite) keeps its mode through os.open
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_federation_keys(out: str | Path, *, nodes: list[str], hosts: tuple[str, ...] = (), days: int = 365,
                         overwrite: bool = False) -> Keys:
    """Write a CA, a SuperLink certificate and node key pairs into ``out``.

    Parameters
    ----------
    out : str or Path
        Folder to write into (created).
    nodes : list of str
        Names of the SuperNodes to make key pairs for.
    hosts : tuple of str, optional
        Host names and IP addresses the SuperLink is reached at, besides loopback.
    days : int, optional
        Validity of the certificates (default 365).
    overwrite : bool, optional
        Replace files already there (default: refuse).

    Returns
    -------
    Keys
        The folder's layout, every file of it written (``node_key(name)`` for each of ``nodes``).

    Raises
    ------
    FileExistsError
        If ``out`` already holds a CA and ``overwrite`` is false: new certificates would lock out
        every node that trusts the old CA.
    ValueError
        If ``days`` < 1, a node name is no file name, or a host is neither an IP address nor a DNS name.
    """
    keys = Keys(Path(out))
    if keys.ca.exists() and not overwrite:
        raise FileExistsError(f"{keys.ca} exists: nodes that trust it would be locked out by a new CA. "
                              "Use another folder, or pass --overwrite")
    if days < 1:
        raise ValueError(f"--days {days}: certificates must be valid for at least a day")
    bad = [n for n in nodes if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"node names {bad} cannot be file names: use letters, digits, '-' and '_'")
    keys.nodes.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtl test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*LOOPBACK, *hosts]))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if not hosts else hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))
    keys.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _private(keys.ca_key, _pem_key(ca_key))
    keys.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _private(keys.server_key, _pem_key(server_key))
    for name in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        _private(keys.node_key(name), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()))
        keys.node_public_key(name).write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys
