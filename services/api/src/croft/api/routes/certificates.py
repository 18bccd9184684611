"""`/1.0/certificates`: the trust store (`lxc config trust ...`, `lxc remote add`).

The auth service keeps the records and decides; this module is LXD's REST face of it:

* root (the unix socket) or a trusted, unrestricted client adds a certificate
  (`lxc config trust add CERT`) or asks for a token (`lxc config trust add --name X`): a
  `token` operation whose metadata carries the secret, as LXD 5.0's does, so that
  `lxc config trust list-tokens` and `revoke-token` work unchanged;
* an untrusted HTTPS client adds the certificate it connected with by showing a token as
  the `password` (`lxc remote add NAME TOKEN`, or `... https://HOST:8443 --password
  TOKEN`), or as the `trust_token` (lxc 5.21's explicit_trust_token): the token is used
  up and the certificate trusted in one step (`domain/trust_tokens.redeem`);
* or by showing `core.trust_password` as the `password` (LXD 5.0's older way, which
  `lxc remote add --password` and pylxd's `Client.authenticate` use): the certificate
  given, or the one it connected with, is trusted (croft.api.trust_password).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from croft.api import authz, limits, query, records, responses, trust_password
from croft.api.auth import auth_call, trust_cache
from croft.api.authz import identity_key
from croft.api.context import context
from croft.api.domain import trust_tokens
from croft.api.https_listener import serving_address
from croft.api.identity import Identity, identity
from croft.common.clients import AuthClient
from croft.common.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from croft.v1 import auth_pb2, common_pb2

log = logging.getLogger(__name__)
router = APIRouter()

NOT_AUTHORIZED = "not authorized"


def certificate_url(fingerprint: str) -> str:
    return f"/1.0/certificates/{fingerprint}"


def render_certificate(record: dict[str, Any]) -> dict[str, Any]:
    """LXD 5.0's Certificate, fields in its order."""
    return {
        "name": record.get("name", ""),
        "type": record.get("type", "client"),
        "restricted": record.get("restricted", False),
        "projects": record.get("projects") or [],
        "certificate": record.get("certificate", ""),
        "fingerprint": record["fingerprint"],
    }


def _is_admin(who: Identity) -> bool:
    """LXD's rbac.UserIsAdmin without RBAC: the socket's root and unrestricted clients."""
    return who.trusted and not who.restricted


class CertificatesPost(BaseModel):
    """LXD's CertificatesPost."""

    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    type: StrictStr = ""
    restricted: StrictBool = False
    projects: list[StrictStr] | None = None
    certificate: StrictStr = ""
    password: StrictStr = ""
    token: StrictBool = False
    trust_token: StrictStr = ""  # LXD's explicit_trust_token (lxc 5.21 and later)


class CertificatePut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: limits.Name = ""
    type: StrictStr = ""
    restricted: StrictBool = False
    projects: list[StrictStr] | None = None
    certificate: StrictStr = ""


# ---------------------------------------------------------------------------- reading


async def _list() -> list[dict[str, Any]]:
    reply = await auth_call(AuthClient.list_certificates, common_pb2.Empty())
    found: list[dict[str, Any]] = json.loads(reply.json)
    return found


async def _get(fingerprint: str) -> dict[str, Any]:
    reply = await auth_call(
        AuthClient.get_certificate, auth_pb2.CertificateRef(fingerprint=fingerprint)
    )
    record: dict[str, Any] = json.loads(reply.json)
    return record


@router.get("/1.0/certificates")
async def certificates_list(request: Request) -> Response:
    who = identity(request)
    found = await _list()
    if who.restricted:
        # Other clients' names and projects are not a restricted client's to see (LXD
        # shows such a client its own certificate only).
        found = [c for c in found if c["fingerprint"] == who.fingerprint]
    listing = query.listing(
        found,
        request,
        lambda c: certificate_url(c["fingerprint"]),
        render=render_certificate,
    )
    return responses.sync(listing)


@router.get("/1.0/certificates/{fingerprint}")
async def certificate_get(request: Request, fingerprint: str) -> Response:
    who = identity(request)
    shown = render_certificate(await _get(fingerprint))
    if who.restricted and shown["fingerprint"] != who.fingerprint:
        raise NotFound("Certificate not found")
    return responses.sync(shown, etag=records.etag(shown))


# ---------------------------------------------------------------------------- adding


@router.post("/1.0/certificates")
async def certificates_post(request: Request) -> Response:
    req = await query.body(request, CertificatesPost)
    who = identity(request)
    if req.token and req.certificate:
        raise InvalidArgument("Can't use certificate if token is requested")
    if req.token:
        if (req.type or "client") != "client":
            raise InvalidArgument("Tokens can only be issued for client certificates")
        if not serving_address(request):
            raise InvalidArgument("Can't issue token when server isn't listening on network")
    if who.trusted and req.trust_token:
        raise Conflict("Client is already trusted")
    if who.trusted and not req.certificate and not req.token:
        raise InvalidArgument("Client is already trusted")
    if not _is_admin(who):
        if req.token or not (req.password or req.trust_token):
            raise PermissionDenied(NOT_AUTHORIZED)
        if req.trust_token:
            # LXD's explicit_trust_token: a token, never a password.
            secret = trust_tokens.token_secret(req.trust_token)
            if secret is None:
                raise PermissionDenied(NOT_AUTHORIZED)
            return await _trust_with_token(request, secret)
        secret = trust_tokens.token_secret(req.password)
        if secret is None:
            return await _trust_with_password(request, who, req)
        return await _trust_with_token(request, secret)
    if req.token:
        return await _create_token(request, req)
    return await _add(
        request,
        who,
        req,
        type=req.type or "client",
        restricted=req.restricted,
        projects=req.projects or [],
    )


async def _add(
    request: Request,
    who: Identity,
    req: CertificatesPost,
    *,
    type: str,
    restricted: bool,
    projects: list[str],
) -> Response:
    """Trust the certificate given, or the one the client connected with."""
    if not req.certificate:
        if who.protocol != "tls":
            raise InvalidArgument("Can't use TLS data on non-TLS link")
        if not who.certificate:
            raise InvalidArgument("No client certificate provided")
    reply = await auth_call(
        AuthClient.add_certificate,
        auth_pb2.AddCertificateRequest(
            certificate=req.certificate or who.certificate,
            name=req.name,
            type=type,
            restricted=restricted,
            projects=projects,
            address=_host(request),
        ),
        idempotent=False,
    )
    return await _added(request, json.loads(reply.json))


async def _added(request: Request, record: dict[str, Any]) -> Response:
    fingerprint = record["fingerprint"]
    trust_cache.forget(fingerprint)
    url = certificate_url(fingerprint)
    await context(request).lifecycle("certificate-created", url, request=request)
    return responses.created(url)


def _host(request: Request) -> str:
    return request.client.host if request.client else ""


async def _trust_with_password(request: Request, who: Identity, req: CertificatesPost) -> Response:
    """LXD's core.trust_password: the certificate given (pylxd sends it) or the one the
    client connected with is trusted, unrestricted, when the password matches."""
    address = _host(request)
    if trust_password.attempts.blocked(address):
        log.warning("refused a trust password from %s: too many failed attempts", address)
        raise PermissionDenied("Too many failed trust password attempts, try again later")
    found = await context(request).store.get_json(records.SERVER_CONFIG_KEY)
    stored = (found[0].get("config") or {}).get(trust_password.TRUST_PASSWORD, "") if found else ""
    matches = bool(stored) and await asyncio.to_thread(
        trust_password.password_matches, stored, req.password
    )
    if not matches:
        trust_password.attempts.failed(address)
        log.warning("refused a trust request with a wrong password from %s", address)
        raise PermissionDenied(NOT_AUTHORIZED)
    trust_password.attempts.succeeded(address)
    return await _add(request, who, req, type="client", restricted=False, projects=[])


async def _trust_with_token(request: Request, secret: str) -> Response:
    """An untrusted client shows a token: the certificate it connected with is trusted."""
    return await _added(request, await trust_tokens.redeem(request, secret))


async def _create_token(request: Request, req: CertificatesPost) -> Response:
    if not req.name:
        raise InvalidArgument("A token needs the name of the client it is for (--name)")
    operation = await trust_tokens.issue(
        context(request), serving_address(request), req.name, req.restricted, req.projects or []
    )
    return responses.async_operation(operation)


# ---------------------------------------------------------------------------- changing


@router.put("/1.0/certificates/{fingerprint}")
@router.patch("/1.0/certificates/{fingerprint}")
async def certificate_update(request: Request, fingerprint: str) -> Response:
    # PUT replaces; PATCH (LXD's) changes only what the body names.
    patch = request.method == "PATCH"
    data = await query.json_body(request)
    req = query.validate(data, CertificatePut)
    current = render_certificate(await _get(fingerprint))
    query.check_if_match(request, records.etag(current))
    if req.certificate and req.certificate.strip() != current["certificate"].strip():
        raise InvalidArgument("Changing a trusted certificate's certificate is not supported")
    wanted = {
        "name": req.name,
        "type": req.type or "client",
        "restricted": req.restricted,
        "projects": req.projects or [],
    }
    if patch:
        wanted = {k: (wanted[k] if k in data else current[k]) for k in wanted}
    reply = await auth_call(
        AuthClient.update_certificate,
        common_pb2.Json(json=json.dumps({"fingerprint": current["fingerprint"], **wanted})),
    )
    updated = json.loads(reply.json)
    trust_cache.forget(updated["fingerprint"])
    await context(request).lifecycle(
        "certificate-updated", certificate_url(updated["fingerprint"]), request=request
    )
    return responses.empty_sync()


@router.delete("/1.0/certificates/{fingerprint}")
async def certificate_delete(request: Request, fingerprint: str) -> Response:
    full = (await _get(fingerprint))["fingerprint"]
    await auth_call(AuthClient.delete_certificate, auth_pb2.CertificateRef(fingerprint=full))
    trust_cache.forget(full)
    # Its groups go with it (a certificate trusted again later starts in none).
    with contextlib.suppress(NotFound):
        await context(request).store.delete(identity_key("tls", full))
    authz.forget_on_change(request)
    await context(request).lifecycle("certificate-deleted", certificate_url(full), request=request)
    return responses.empty_sync()
