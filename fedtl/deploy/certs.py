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
class FederationKeys:
    """Paths of the files ``make_federation_keys`` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


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
                         overwrite: bool = False) -> FederationKeys:
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
    FederationKeys
        Where each file was written.

    Raises
    ------
    FileExistsError
        If ``out`` already holds a CA and ``overwrite`` is false: new certificates would lock out
        every node that trusts the old CA.
    ValueError
        If ``days`` < 1, a node name is no file name, or a host is neither an IP address nor a DNS name.
    """
    out = Path(out)
    if (out / "ca.crt").exists() and not overwrite:
        raise FileExistsError(f"{out / 'ca.crt'} exists: nodes that trust it would be locked out by a new CA. "
                              "Use another folder, or pass --overwrite")
    if days < 1:
        raise ValueError(f"--days {days}: certificates must be valid for at least a day")
    bad = [n for n in nodes if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"node names {bad} cannot be file names: use letters, digits, '-' and '_'")
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
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
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _private(out / "ca.key", _pem_key(ca_key))
    (out / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _private(out / "server.key", _pem_key(server_key))
    pairs = {}
    for name in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / "nodes" / name, out / "nodes" / f"{name}.pub"
        _private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
        pairs[name] = (private, public)
    return FederationKeys(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key", pairs)
