"""Mutual TLS between croft's own parts: its services' gRPC and its etcd.

Nothing of croft's inside is open to whoever can reach a port: every gRPC server and
every etcd port (client and peer) asks for a certificate signed by the cluster's internal
certificate authority, and every client presents one. A local user, or a host on a
cluster's network, without the member's key gets no further than the handshake.

On disk, under `<state_dir>/internal/` (0700, root's):

- `ca.crt` + `ca.key`: the authority. A standalone croft makes its own at first start;
  a member that joins a cluster is given the cluster's with its join reply (as every LXD
  member holds the cluster's key), so that the members trust each other;
- `member.crt` + `member.key`: this member's certificate, signed by the authority, for
  both ends of a connection (serverAuth and clientAuth), valid for `NAME` (what gRPC
  clients check, whatever address they dial), loopback and this member's address (what
  etcd's peers and Go clients check). It is made again when the authority or the address
  changes.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The name every member's certificate carries and every gRPC client checks (the address
# dialled is an ephemeral port on loopback or a member's address, never a name).
NAME = "croft-internal"
# What a gRPC channel checks the server's certificate against, whatever address it dials.
GRPC_OPTIONS = [("grpc.ssl_target_name_override", NAME)]
VALIDITY = datetime.timedelta(days=3650)
DIRECTORY = "internal"


@dataclass(frozen=True)
class Identity:
    """The authority's certificate and this member's certificate and key, PEM."""

    ca: bytes
    cert: bytes
    key: bytes
    directory: Path

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert_path(self) -> Path:
        return self.directory / "member.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "member.key"

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC client side: present the member's certificate, accept a server of the
        same authority (dial with GRPC_OPTIONS: the name every member certificate has)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server side: serve the member's certificate, require one of the same
        authority from every client."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A client context for etcd's HTTP endpoints (health): our certificate, theirs
        checked against the authority."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.check_hostname = False  # the authority is ours alone: its signature is the check
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context


def directory(state_dir: Path) -> Path:
    return state_dir / DIRECTORY


def load(state_dir: Path) -> Identity | None:
    """This member's identity, or None when it has none yet."""
    where = directory(state_dir)
    try:
        return Identity(
            ca=(where / "ca.crt").read_bytes(),
            cert=(where / "member.crt").read_bytes(),
            key=(where / "member.key").read_bytes(),
            directory=where,
        )
    except FileNotFoundError:
        return None


def ensure(state_dir: Path, address: str = "") -> Identity:
    """This member's identity, made where missing: the authority (a new one for a
    standalone croft) and a member certificate for `address` (an IP; '' for loopback
    only), made again when it was not signed by the authority or does not name it."""
    where = directory(state_dir)
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(where):
        ca_cert, ca_key = where / "ca.crt", where / "ca.key"
        if not ca_cert.exists() or not ca_key.exists():
            cert, key = _authority()
            write_authority(state_dir, cert, key)
        authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
        member = where / "member.crt"
        if not member.exists() or not _current(member.read_bytes(), authority, address):
            ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), None)
            assert isinstance(ca_private, ec.EllipticCurvePrivateKey)
            cert, key = _member(authority, ca_private, address)
            _write(where / "member.key", key, 0o600)
            _write(member, cert, 0o644)
    found = load(state_dir)
    assert found is not None
    return found


def write_authority(state_dir: Path, cert: bytes | str, key: bytes | str) -> None:
    """Install an authority (the cluster's, given to a joining member); the member
    certificate is made again from it at the next `ensure`."""
    where = directory(state_dir)
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    as_bytes = [v.encode() if isinstance(v, str) else v for v in (cert, key)]
    _write(where / "ca.key", as_bytes[1], 0o600)
    _write(where / "ca.crt", as_bytes[0], 0o644)
    (where / "member.crt").unlink(missing_ok=True)


def read_authority(state_dir: Path) -> tuple[str, str]:
    """The authority's certificate and key, PEM text (for a joining member)."""
    where = directory(state_dir)
    return (where / "ca.crt").read_text(), (where / "ca.key").read_text()


# ---------------------------------------------------------------------------- making


@contextmanager
def _locked(where: Path) -> Iterator[None]:
    with open(where / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _authority() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "croft internal authority")])
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key)


def _addresses(address: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    if address:
        ip = ipaddress.ip_address(address.strip("[]"))
        if ip not in found:
            found.append(ip)
    return found


def _member(
    authority: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, address: str
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    san: list[x509.GeneralName] = [x509.DNSName(NAME)]
    san += [x509.IPAddress(ip) for ip in _addresses(address)]
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        _builder(name, authority.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _pem(cert, key)


def _current(pem: bytes, authority: x509.Certificate, address: str) -> bool:
    """Whether a member certificate was signed by `authority` and names `address`."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(authority)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return set(_addresses(address)) <= set(names.get_values_for_type(x509.IPAddress))
