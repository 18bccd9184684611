"""Trust tokens (LXD's certificate add tokens): issued as a `token` operation whose
metadata carries the secret (`lxc config trust add --name X`, and a pending fine-grained
TLS identity from `POST /1.0/auth/identities/tls` with `token: true`); the auth service
keeps the token and uses it up when a client shows it."""

from __future__ import annotations

import contextlib
from typing import Any

from croft.api.auth import auth_call
from croft.api.context import ApiContext
from croft.api.serving import listen_addresses
from croft.api.tls import certificate_fingerprint
from croft.common.clients import AuthClient
from croft.common.errors import CroftError
from croft.v1 import auth_pb2


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
