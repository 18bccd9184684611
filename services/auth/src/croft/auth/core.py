"""The trust store: which TLS client certificates croft trusts, and the tokens that let a
client add its own certificate.

Records (LXD's API shape, in the store):

``/croft/records/certificates/default/<fingerprint>``
    LXD's Certificate: ``{"name", "type", "restricted", "projects", "certificate" (PEM),
    "fingerprint"}``; the fingerprint is the sha256 of the DER certificate.
``/croft/records/certificate-tokens/default/<sha256 of the secret>``
    ``{"name", "type", "restricted", "projects", "expires_at", "created_at"}``: what a
    token's holder will be trusted as. The secret itself is never stored here.

A token is usable while its api-side operation (class ``token``, whose metadata carries
the secret, as in LXD) is running: deleting that operation (``lxc config trust
revoke-token``) revokes it. Using a token removes its record and stores the certificate in
one transaction, so a token is used at most once, whichever replica is asked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from croft.common.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from croft.common.records import record_key, record_prefix
from croft.common.store import Create, Delete, Store, dump

log = logging.getLogger(__name__)

CERTIFICATES = "certificates"
TOKENS = "certificate-tokens"
PROJECT = "default"  # LXD keeps the trust store and its tokens outside projects
OPERATIONS_PREFIX = "/croft/operations/"  # the api's operation records (read only here)
CERTIFICATE_TYPES = ("client", "metrics")
CERTIFICATE_NOT_FOUND = "Certificate not found"
NO_TOKEN = "No matching certificate add operation found"
# A token record whose operation was never created (the api failed in between) is
# dropped after this many seconds.
ORPHAN_TOKEN_AGE = 600.0


def certificate_key(fingerprint: str) -> str:
    return record_key(CERTIFICATES, PROJECT, fingerprint)


def token_key(secret: str) -> str:
    return record_key(TOKENS, PROJECT, hashlib.sha256(secret.encode()).hexdigest())


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not an RFC 3339 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class ParsedCertificate:
    """A client certificate as croft checks and stores it."""

    der: bytes
    fingerprint: str
    common_name: str

    @property
    def pem(self) -> str:
        body = base64.encodebytes(self.der).decode().replace("\n", "")
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def fingerprint_of(der: bytes) -> str:
    """LXD's certificate fingerprint: sha256 of the DER bytes, lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def parse_certificate(text: str) -> ParsedCertificate:
    """A certificate given as PEM or as base64 DER (what `lxc config trust add` sends),
    checked as LXD checks it: valid now, RSA keys of 2048 bits at least."""
    text = text.strip()
    if not text:
        raise InvalidArgument("No certificate provided")
    try:
        if text.startswith("-----BEGIN"):
            cert = x509.load_pem_x509_certificate(text.encode())
        else:
            # Go's base64 decoder, LXD's, skips line breaks: pylxd sends a PEM body.
            der = base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)
            cert = x509.load_der_x509_certificate(der)
    except (ValueError, binascii.Error) as exc:
        raise InvalidArgument(f"Invalid certificate material: {exc}") from None
    now = _now()
    if now < cert.not_valid_before_utc:
        raise InvalidArgument("The provided certificate isn't valid yet")
    if now > cert.not_valid_after_utc:
        raise InvalidArgument("The provided certificate is expired")
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidArgument("RSA key is too weak (minimum of 2048bit)")
    der = cert.public_bytes(serialization.Encoding.DER)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    return ParsedCertificate(der, fingerprint_of(der), common_name)


@dataclass(frozen=True)
class CertificatePut:
    """What LXD lets a client set on a certificate (CertificatePut, minus the PEM)."""

    name: str = ""
    type: str = "client"
    restricted: bool = False
    projects: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.type not in CERTIFICATE_TYPES:
            raise InvalidArgument(f"Unknown certificate type {self.type!r}")
        for project in self.projects:
            if not project or "/" in project:
                raise InvalidArgument(f"Invalid project name {project!r}")

    @classmethod
    def from_json(cls, data: Any) -> CertificatePut:
        if not isinstance(data, dict):
            raise InvalidArgument("a certificate update must be a JSON object")
        name, kind = data.get("name", ""), data.get("type", "") or "client"
        restricted, projects = data.get("restricted", False), data.get("projects") or []
        if not isinstance(name, str) or not isinstance(kind, str):
            raise InvalidArgument("name and type must be strings")
        if not isinstance(restricted, bool):
            raise InvalidArgument("restricted must be a boolean")
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            raise InvalidArgument("projects must be a list of project names")
        return cls(name, kind, restricted, tuple(projects))


def certificate_record(parsed: ParsedCertificate, put: CertificatePut) -> dict[str, Any]:
    """LXD's Certificate, fields in LXD's order."""
    return {
        "name": put.name,
        "type": put.type,
        "restricted": put.restricted,
        "projects": list(put.projects),
        "certificate": parsed.pem,
        "fingerprint": parsed.fingerprint,
    }


@dataclass(frozen=True)
class Trust:
    """The answer to "is this certificate trusted", and as what."""

    trusted: bool
    certificate: dict[str, Any] | None = None  # the record without its PEM


# ---------------------------------------------------------------------------- the core


class TrustStore:
    """Trusted certificates and trust tokens, in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- certificates -------------------------------------------------------------------

    async def is_trusted(self, fingerprint: str) -> Trust:
        """Trusted means: a certificate record with exactly this fingerprint exists."""
        if len(fingerprint) != 64:
            return Trust(False)
        found = await self.store.get_json(certificate_key(fingerprint.lower()))
        if found is None:
            return Trust(False)
        record = {k: v for k, v in found[0].items() if k != "certificate"}
        return Trust(True, record)

    async def list(self) -> list[dict[str, Any]]:
        entries = await self.store.list(record_prefix(CERTIFICATES, PROJECT))
        return [e.json() for e in entries]

    async def find(self, fingerprint: str) -> tuple[dict[str, Any], int]:
        """The certificate whose fingerprint is, or starts with, `fingerprint`, and its
        revision. NotFound, or InvalidArgument when a prefix matches several."""
        prefix = fingerprint.lower()
        if not prefix or any(c not in "0123456789abcdef" for c in prefix) or len(prefix) > 64:
            raise NotFound(CERTIFICATE_NOT_FOUND)
        entries = await self.store.list(certificate_key(prefix))
        if not entries:
            raise NotFound(CERTIFICATE_NOT_FOUND)
        if len(entries) > 1:
            raise InvalidArgument("More than one certificate matches")
        return entries[0].json(), entries[0].revision

    async def add(self, certificate: str, put: CertificatePut, address: str = "") -> dict[str, Any]:
        """Trust a certificate. The name defaults to its CN, then to the client address.
        Conflict when it is trusted already; nothing changes then."""
        parsed = parse_certificate(certificate)
        put = _named(put, parsed, address)
        record = certificate_record(parsed, put)
        try:
            await self.store.create_json(certificate_key(parsed.fingerprint), record)
        except Conflict:
            raise Conflict("Certificate already in trust store") from None
        log.info("trusting certificate %s (%s)", parsed.fingerprint[:12], put.name)
        return record

    async def update(self, fingerprint: str, put: CertificatePut) -> dict[str, Any]:
        for _ in range(10):
            record, revision = await self.find(fingerprint)
            new = {
                **record,
                "name": put.name,
                "type": put.type,
                "restricted": put.restricted,
                "projects": list(put.projects),
            }
            try:
                await self.store.update_json(
                    certificate_key(record["fingerprint"]), new, revision=revision
                )
            except Conflict:
                continue
            except NotFound:
                raise NotFound(CERTIFICATE_NOT_FOUND) from None
            return new
        raise Conflict("The certificate is changing too fast to be updated; try again")

    async def delete(self, fingerprint: str) -> str:
        """Stop trusting a certificate (fingerprint or unique prefix); returns the full
        fingerprint."""
        record, revision = await self.find(fingerprint)
        full: str = record["fingerprint"]
        try:
            await self.store.delete(certificate_key(full), revision=revision)
        except Conflict:
            # Changed meanwhile (renamed): it goes all the same.
            await self.store.delete(certificate_key(full))
        except NotFound:
            raise NotFound(CERTIFICATE_NOT_FOUND) from None
        log.info("no longer trusting certificate %s", full[:12])
        return full

    # -- tokens -------------------------------------------------------------------------

    async def create_token(self, put: CertificatePut, expires_at: str = "") -> str:
        """A new token for a client to be trusted as `put` describes; returns its secret.
        The caller publishes it in a token operation; until that operation runs, the token
        cannot be used."""
        if not put.name:
            raise InvalidArgument("A token needs the name of the client it is for")
        if put.type != "client":
            raise InvalidArgument("Tokens can only be issued for client certificates")
        if expires_at:
            _parse_time(expires_at, "expires_at")
        await self._drop_orphaned_tokens()
        secret = secrets.token_hex(32)
        record = {
            "name": put.name,
            "type": put.type,
            "restricted": put.restricted,
            "projects": list(put.projects),
            "expires_at": expires_at,
            "created_at": _rfc3339(_now()),
        }
        await self.store.create_json(token_key(secret), record)
        return secret

    async def revoke_token(self, secret: str) -> None:
        with contextlib.suppress(NotFound):
            await self.store.delete(token_key(secret))

    async def trust_with_token(
        self, secret: str, certificate: str, address: str = ""
    ) -> tuple[dict[str, Any], str]:
        """Trust `certificate` on the token whose secret is `secret`: the token's record
        goes and the certificate's comes in one transaction. Returns the certificate
        record and the token's operation id (for the caller to end). PermissionDenied when
        no running token operation carries the secret or the token expired; Conflict when
        the certificate is trusted already (the token is kept then)."""
        if not secret:
            raise PermissionDenied(NO_TOKEN)
        key = token_key(secret)
        entry = await self.store.get(key)
        operation_id = await self._token_operation(secret)
        if entry is None or operation_id is None:
            if entry is not None:
                with contextlib.suppress(Conflict, NotFound):
                    await self.store.delete(key, revision=entry.revision)
            raise PermissionDenied(NO_TOKEN)
        token = entry.json()
        if token.get("expires_at") and _now() > _parse_time(token["expires_at"], "expires_at"):
            with contextlib.suppress(Conflict, NotFound):
                await self.store.delete(key, revision=entry.revision)
            raise PermissionDenied("Token has expired")
        parsed = parse_certificate(certificate)
        put = _named(
            CertificatePut(
                token.get("name", ""),
                token.get("type", "client"),
                bool(token.get("restricted", False)),
                tuple(token.get("projects") or ()),
            ),
            parsed,
            address,
        )
        record = certificate_record(parsed, put)
        if await self.store.get(certificate_key(parsed.fingerprint)) is not None:
            raise Conflict("Certificate already in trust store")
        try:
            await self.store.transaction(
                [
                    Delete(key, revision=entry.revision),
                    Create(certificate_key(parsed.fingerprint), dump(record)),
                ]
            )
        except (Conflict, NotFound):
            # The token was used (or revoked) in between, or the certificate appeared.
            if await self.store.get(certificate_key(parsed.fingerprint)) is not None:
                raise Conflict("Certificate already in trust store") from None
            raise PermissionDenied(NO_TOKEN) from None
        log.info("trusting certificate %s (%s) by token", parsed.fingerprint[:12], put.name)
        return record, operation_id

    async def _token_operation(self, secret: str) -> str | None:
        """The id of the running token operation whose metadata carries `secret`."""
        for entry in await self.store.list(OPERATIONS_PREFIX):
            try:
                operation = entry.json()["operation"]
            except (ValueError, KeyError, TypeError):
                continue
            metadata = operation.get("metadata") or {}
            if (
                operation.get("class") == "token"
                and operation.get("status") == "Running"
                and isinstance(metadata, dict)
                and secrets.compare_digest(str(metadata.get("secret", "")), secret)
            ):
                return str(operation["id"])
        return None

    async def _drop_orphaned_tokens(self) -> None:
        """Token records whose operation is gone (revoked, or never made) are dead weight."""
        entries = await self.store.list(record_prefix(TOKENS, PROJECT))
        if not entries:
            return
        live: set[str] = set()
        for op in await self.store.list(OPERATIONS_PREFIX):
            try:
                operation = op.json()["operation"]
                secret = str((operation.get("metadata") or {}).get("secret", ""))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if operation.get("class") == "token" and operation.get("status") == "Running":
                live.add(token_key(secret))
        now = _now()
        for entry in entries:
            if entry.key in live:
                continue
            created = entry.json().get("created_at", "")
            try:
                age = (now - _parse_time(created, "created_at")).total_seconds()
            except InvalidArgument:
                age = ORPHAN_TOKEN_AGE
            if age >= ORPHAN_TOKEN_AGE:
                with contextlib.suppress(Conflict, NotFound):
                    await self.store.delete(entry.key, revision=entry.revision)


def _named(put: CertificatePut, parsed: ParsedCertificate, address: str) -> CertificatePut:
    if put.name:
        return put
    return CertificatePut(parsed.common_name or address, put.type, put.restricted, put.projects)
