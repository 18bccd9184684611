"""Trust tokens (LXD's certificate add tokens): issued as a `token` operation whose
metadata carries the secret (`lxc config trust add --name X`, and a pending fine-grained
TLS identity from `POST /1.0/auth/identities/tls` with `token: true`); the auth service
keeps the token and uses it up when a client shows it (`redeem`): as the `password` of
`POST /1.0/certificates` (lxc 5.0), or as the `trust_token` of `POST /1.0/certificates` and
`POST /1.0/auth/identities/tls` (lxc 5.21 and later)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
from typing import Any

from starlette.requests import HTTPConnection

from croft.api import authz, trust_password
from croft.api.auth import auth_call, trust_cache
from croft.api.context import ApiContext, context
from croft.api.domain import authorization as auth_records
from croft.api.identity import identity
from croft.api.serving import listen_addresses
from croft.api.tls import certificate_fingerprint
from croft.common.clients import AuthClient
from croft.common.errors import CroftError, InvalidArgument, NotFound, PermissionDenied
from croft.v1 import auth_pb2

log = logging.getLogger(__name__)

# LXD's words when no pending identity was issued the token shown (its
# GetPendingTLSIdentityByTokenSecret); LXD wraps them in a 500, croft refuses with 403.
NO_PENDING_IDENTITY = "No pending identities found with given secret"


async def issue(
    ctx: ApiContext, https_address: str, name: str, restricted: bool, projects: list[str]
) -> dict[str, Any]:
    """A new token for a client named `name`: its `token` operation (running until the
    token is used or revoked), or nothing at all when the operation cannot be made."""
    reply = await auth_call(
        AuthClient.create_token,
        auth_pb2.CreateTokenRequest(
            name=name, type="client", restricted=restricted, projects=projects
        ),
        idempotent=False,
    )
    metadata = {
        "secret": reply.secret,
        "fingerprint": certificate_fingerprint(ctx.settings.certificate),
        "addresses": await listen_addresses(https_address),
        "request": {
            "name": name,
            "type": "client",
            "restricted": restricted,
            "projects": projects,
            "certificate": "",
            "password": "",
            "token": True,
        },
    }
    try:
        operation: dict[str, Any] = await ctx.operations.create(
            "Executing operation", cls="token", metadata=metadata, project="default"
        )
    except BaseException:
        with contextlib.suppress(CroftError):
            await auth_call(AuthClient.revoke_token, auth_pb2.TokenSecret(secret=reply.secret))
        raise
    return operation


def token_secret(token: str) -> str | None:
    """The secret of a certificate add token (base64 of LXD's CertificateAddToken JSON);
    None when `token` is not one."""
    try:
        decoded = json.loads(base64.b64decode(token, validate=True))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(decoded, dict):
        return None
    secret = decoded.get("secret")
    return secret if isinstance(secret, str) and secret else None


async def redeem(
    connection: HTTPConnection, secret: str, *, pending_only: bool = False
) -> dict[str, Any]:
    """Trust the certificate the (untrusted) caller connected with on the token whose
    secret is `secret`, and use the token up; returns the certificate's record.

    A token issued for a pending fine-grained identity (`POST /1.0/auth/identities/tls`
    with `token: true`) makes the certificate that identity, held to its groups from its
    first trusted request, so its record is written first (and removed again if the
    trust is refused). With `pending_only` (LXD 5.21's `trust_token` on
    `/1.0/auth/identities/tls`) only such a token is taken. A refused token leaves
    nothing behind and counts against the caller's address, as a wrong trust password
    does (`trust_password.attempts`)."""
    who = identity(connection)
    if who.protocol != "tls":
        raise InvalidArgument("Can't use TLS data on non-TLS link")
    if not who.certificate:
        raise InvalidArgument("No client certificate provided")
    address = connection.client.host if connection.client else ""
    if trust_password.attempts.blocked(address):
        log.warning("refused a trust token from %s: too many failed attempts", address)
        raise PermissionDenied("Too many failed trust token attempts, try again later")
    ctx = context(connection)
    pending = await auth_records.pending_for_token(ctx.store, secret)
    if pending is None and pending_only:
        trust_password.attempts.failed(address)
        log.warning("refused a trust token from %s: no pending identity has it", address)
        raise PermissionDenied(NO_PENDING_IDENTITY)
    prepared = ""
    if pending is not None:
        prepared = await auth_records.prepare_tls_identity(ctx.store, who.certificate, pending[1])
        authz.forget_on_change(connection)
    try:
        reply = await auth_call(
            AuthClient.trust_with_token,
            auth_pb2.TrustWithTokenRequest(
                secret=secret, certificate=who.certificate, address=address
            ),  # fmt: skip
            idempotent=False,
        )
    except BaseException as exc:
        if prepared:
            with contextlib.suppress(CroftError):
                await ctx.store.delete(prepared)
            authz.forget_on_change(connection)
        if isinstance(exc, (PermissionDenied, NotFound)):
            trust_password.attempts.failed(address)
        raise
    if pending is not None:
        with contextlib.suppress(CroftError):
            await ctx.store.delete(pending[0])
        authz.forget_on_change(connection)
    trust_password.attempts.succeeded(address)
    # The token is used: its operation ends as LXD's does, cancelled.
    with contextlib.suppress(CroftError):
        await ctx.operations.cancel(reply.operation_id, wait=0)
    record: dict[str, Any] = json.loads(reply.certificate)
    trust_cache.forget(record["fingerprint"])
    return record
