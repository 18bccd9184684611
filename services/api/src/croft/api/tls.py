"""TLS for the REST API, the way LXD does it.

* The server certificate is `<state_dir>/server.crt` + `server.key`, made at first start
  like LXD's: a self-signed EC P-384 certificate valid ten years, O=linuxcontainers.org,
  CN=root@<host>, the host name as its first DNS name (the `lxc` client pins the
  certificate and checks that name).
* The handshake asks every client for a certificate without requiring one and without
  judging it: a client is whoever holds the certificate whose sha256 fingerprint the
  trust store lists (`croft.api.auth`), and an unknown certificate is still needed on the
  wire, so that its owner can add it with a trust token.
* Every HTTPS request and WSS connection carries the client's certificate in the ASGI TLS
  extension (`scope["extensions"]["tls"]["client_cert_chain"]`, PEM).
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from uvicorn.protocols.http.h11_impl import H11Protocol

from croft.api.wsframes import FramedWebSocketProtocol
from croft.common.errors import Internal

CERT_NAME = "server.crt"
KEY_NAME = "server.key"
VALIDITY = datetime.timedelta(days=3650)
# LXD's InitTLSConfig: TLS 1.2 or newer, forward-secret AEAD suites only.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


@dataclass(frozen=True)
class ServerCertificate:
    """The server's certificate (PEM) and where it and its key are on disk."""

    cert_path: Path
    key_path: Path
    pem: str
    fingerprint: str


def certificate_fingerprint(certificate: bytes | str) -> str:
    """LXD's fingerprint of a certificate given as DER bytes or PEM text: sha256 of the
    DER, lower-case hex."""
    der = ssl.PEM_cert_to_DER_cert(certificate) if isinstance(certificate, str) else certificate
    return hashlib.sha256(der).hexdigest()


def _names() -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    hostname = socket.gethostname() or "UNKNOWN"
    dns = [hostname] + (["localhost"] if hostname != "localhost" else [])
    return dns, [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def generate_certificate(common_name: str) -> tuple[bytes, bytes]:
    """A self-signed server certificate and its key, both PEM, as LXD's GenerateMemCert
    makes them (EC P-384, serverAuth, ten years)."""
    key = ec.generate_private_key(ec.SECP384R1())
    dns, ips = _names()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "linuxcontainers.org"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    san += [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # "EC PRIVATE KEY", as LXD writes it
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_server_certificate(state_dir: Path) -> ServerCertificate:
    """The server certificate under `state_dir`, made on first use. The key is written
    0600 before the certificate, and both atomically: a crash leaves either a usable pair
    or no certificate (a key alone is replaced)."""
    cert_path, key_path = state_dir / CERT_NAME, state_dir / KEY_NAME
    if not (cert_path.is_file() and key_path.is_file()):
        state_dir.mkdir(parents=True, exist_ok=True)
        # Replicas starting together must not each write half of a pair.
        with open(state_dir / ".server-cert.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (cert_path.is_file() and key_path.is_file()):
                hostname = socket.gethostname() or "UNKNOWN"
                cert_pem, key_pem = generate_certificate(f"root@{hostname}")
                _write_atomic(key_path, key_pem, 0o600)
                _write_atomic(cert_path, cert_pem, 0o644)
    pem = cert_path.read_text()
    try:
        fingerprint = certificate_fingerprint(pem)
    except ValueError as exc:
        raise Internal(f"{cert_path} is not a PEM certificate: {exc}") from None
    return ServerCertificate(cert_path, key_path, pem, fingerprint)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


# ---------------------------------------------------------------------------- the handshake

# Python's ssl module can ask for a client certificate only if it also verifies it
# against a CA, and LXD's clients present self-signed certificates that no CA vouches
# for. OpenSSL itself can ask without judging (a verify callback that accepts): set one
# on the context's SSL_CTX. The pointer is the first field after the object header of
# CPython's PySSLContext; `_check_verify_callback` makes sure it is, or refuses to serve.
_SSL_VERIFY_PEER = 0x01
_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_any(preverify_ok: int, store_context: int | None) -> int:
    return 1


# (Wrapped by a call, not as a decorator: ctypes' function types are untyped to mypy.)
_accept_any_certificate = _VERIFY_CALLBACK(_accept_any)


def _libssl() -> ctypes.CDLL:
    # The same libssl the ssl module uses (symbols resolve through _ssl's dependencies).
    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]
    lib.SSL_CTX_set_verify.restype = None
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_callback.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_callback.restype = ctypes.c_void_p
    return lib


def _request_any_client_certificate(context: ssl.SSLContext) -> None:
    context.verify_mode = ssl.CERT_OPTIONAL  # sends the request; Python knows it asks
    lib = _libssl()
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_verify_mode(pointer) != _SSL_VERIFY_PEER:
        raise Internal("cannot reach the TLS context of this Python to accept client certificates")
    lib.SSL_CTX_set_verify(pointer, _SSL_VERIFY_PEER, _accept_any_certificate)
    callback = ctypes.cast(_accept_any_certificate, ctypes.c_void_p).value
    if lib.SSL_CTX_get_verify_callback(pointer) != callback:
        raise Internal("could not install the client certificate callback")


def server_ssl_context(certificate: ServerCertificate) -> ssl.SSLContext:
    """The server side of LXD's TLS: our certificate, TLS 1.2+, AEAD suites, a client
    certificate asked for but not required and not verified (the trust store decides)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.load_cert_chain(certificate.cert_path, certificate.key_path)
    _request_any_client_certificate(context)
    return context


# ---------------------------------------------------------------------------- the ASGI scope


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection: the client's certificate (PEM; [] when it
    sent none). None for a connection without TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


def peer_certificate(scope: Scope) -> str | None:
    """The PEM certificate the client of this request presented, or None."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return str(chain[0]) if chain else None


def _with_tls(app: ASGIApp, tls: dict[str, Any] | None) -> ASGIApp:
    if tls is None:
        return app

    async def app_with_tls(scope: Scope, receive: Any, send: Any) -> Any:
        extensions = scope.get("extensions")
        scope["extensions"] = {**(extensions or {}), "tls": tls}
        return await app(scope, receive, send)

    return app_with_tls


class TLSH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, adding the ASGI TLS extension to each request."""

    # uvicorn declares a BaseTransport; a TCP server's connections are always Transports.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_tls(self.app, tls_extension(transport))


class TLSWebSocketProtocol(FramedWebSocketProtocol):
    """uvicorn's websocket protocol, adding the ASGI TLS extension to the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.app = _with_tls(self.app, tls_extension(transport))
