"""`/1.0/auth/...`, LXD's fine-grained authorization API: groups and their permissions,
identities (TLS certificates of the trust store, OIDC users) and their groups, identity
provider groups mapped to groups, and the permissions there are to grant.

The middleware already asked each request's one question (`croft.api.access_rules`);
lists show only what the caller may view (`query.listing`). Every write drops this
replica's copy of the records (`authz.forget_on_change`), so it holds on the next request.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import authz, query, records, responses
from croft.api.auth import NOT_AUTHORIZED, auth_call, trust_cache
from croft.api.authz import group_url, identity_key, identity_url, idp_group_key, idp_group_url
from croft.api.context import context
from croft.api.domain import authorization as auth_records
from croft.api.domain import trust_tokens
from croft.api.entitlements import MODEL, PROJECT_SCOPED, entitlements_of
from croft.api.https_listener import serving_address
from croft.api.identity import identity
from croft.common.clients import AuthClient
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound, PermissionDenied
from croft.common.store import Create, Delete, dump
from croft.v1 import auth_pb2, common_pb2

router = APIRouter()


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await query.read_body(request) or b"{}")
    except ValueError as exc:
        raise InvalidArgument(f"Invalid request body: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("Invalid request body: expected an object")
    return body


def _changed(request: Request) -> None:
    authz.forget_on_change(request)


# ---------------------------------------------------------------------------- groups


@router.get("/1.0/auth/groups")
async def groups_list(request: Request) -> Response:
    everything = await auth_records.all_records(context(request).store)
    groups = [
        auth_records.render_group(record, everything)
        for key, (record, _) in sorted(everything.items())
        if key.startswith(authz.GROUPS)
    ]
    return responses.sync(query.listing(groups, request, lambda g: group_url(g["name"])))


@router.post("/1.0/auth/groups")
async def groups_post(request: Request) -> Response:
    body = await _body(request)
    name = str(body.get("name", ""))
    await auth_records.create_group(
        context(request).store,
        name,
        str(body.get("description", "")),
        body.get("permissions") or [],
    )
    _changed(request)
    await context(request).lifecycle("auth-group-created", group_url(name), request=request)
    return responses.created(group_url(name))


@router.get("/1.0/auth/groups/{name}")
async def group_get(request: Request, name: str) -> Response:
    store = context(request).store
    await auth_records.get_group(store, name)
    everything = await auth_records.all_records(store)
    record = everything[authz.group_key(name)][0]
    rendered = auth_records.render_group(record, everything)
    return responses.sync(
        rendered, etag=records.etag([rendered["description"], rendered["permissions"]])
    )


@router.put("/1.0/auth/groups/{name}")
@router.patch("/1.0/auth/groups/{name}")
async def group_put(request: Request, name: str) -> Response:
    store = context(request).store
    record, revision = await auth_records.get_group(store, name)
    body = await _body(request)
    permissions = auth_records.check_permissions(body.get("permissions") or [])
    if request.method == "PATCH":
        merged = list(record.get("permissions") or [])
        merged += [p for p in permissions if p not in merged]
        description = str(body.get("description") or record.get("description", ""))
    else:
        merged = permissions
        description = str(body.get("description", ""))
    updated = {**record, "description": description, "permissions": merged}
    await store.update_json(authz.group_key(name), updated, revision=revision)
    _changed(request)
    await context(request).lifecycle("auth-group-updated", group_url(name), request=request)
    return responses.empty_sync()


@router.post("/1.0/auth/groups/{name}")
async def group_rename(request: Request, name: str) -> Response:
    new = str((await _body(request)).get("name", ""))
    await auth_records.rename_or_delete_group(context(request).store, name, new)
    _changed(request)
    await context(request).lifecycle("auth-group-renamed", group_url(new), request=request,
                                     context={"old_name": name})  # fmt: skip
    return responses.created(group_url(new))


@router.delete("/1.0/auth/groups/{name}")
async def group_delete(request: Request, name: str) -> Response:
    await auth_records.rename_or_delete_group(context(request).store, name, None)
    _changed(request)
    await context(request).lifecycle("auth-group-deleted", group_url(name), request=request)
    return responses.empty_sync()


# ---------------------------------------------------------------------------- identities


async def _identities(request: Request, method: str | None) -> list[dict[str, Any]]:
    """Every identity: each certificate of the trust store (its groups from its record)
    and each OIDC user with a record."""
    everything = await auth_records.all_records(context(request).store)
    out: list[dict[str, Any]] = []
    if method in (None, "tls"):
        reply = await auth_call(AuthClient.list_certificates, common_pb2.Empty())
        for cert in json.loads(reply.json):
            if cert.get("type", "client") != "client":
                continue
            fingerprint = cert["fingerprint"]
            found = everything.get(identity_key("tls", fingerprint))
            if found and found[0].get("fine_grained"):
                kind = "Client certificate"
            elif cert.get("restricted"):
                kind = "Client certificate (restricted)"
            else:
                kind = "Client certificate (unrestricted)"
            out.append(
                {
                    "authentication_method": "tls",
                    "type": kind,
                    "id": fingerprint,
                    "name": cert.get("name", ""),
                    "groups": (found[0].get("groups") if found else None) or [],
                    "tls_certificate": cert.get("certificate", ""),
                }
            )
        for key, (record, _) in sorted(everything.items()):
            if key.startswith(identity_key("tls", "")) and record.get("pending"):
                out.append(
                    {
                        "authentication_method": "tls",
                        "type": "Client certificate (pending)",
                        "id": record["id"],
                        "name": record.get("name", ""),
                        "groups": record.get("groups") or [],
                        "tls_certificate": "",
                    }
                )
    if method in (None, "oidc"):
        prefix = identity_key("oidc", "")
        for key, (record, _) in sorted(everything.items()):
            if key.startswith(prefix):
                out.append(
                    {
                        "authentication_method": "oidc",
                        "type": "OIDC client",
                        "id": record["id"],
                        "name": record.get("name", ""),
                        "groups": record.get("groups") or [],
                        "tls_certificate": "",
                    }
                )
    return out


def _check_method(method: str) -> None:
    if method not in ("tls", "oidc"):
        raise InvalidArgument(f'Invalid authentication method "{method}"')


@router.get("/1.0/auth/identities")
async def identities_list(request: Request) -> Response:
    found = await _identities(request, None)
    return responses.sync(
        query.listing(found, request, lambda i: identity_url(i["authentication_method"], i["id"]))
    )


@router.get("/1.0/auth/identities/current")
async def identity_current(request: Request) -> Response:
    who = identity(request)
    state = await context(request).authorizer.state()
    held = state.grants_of(who)
    groups = state.groups_of(who) if held is not None else []
    permissions = [p for name in groups for p in state.groups[name].get("permissions") or []]
    return responses.sync(
        {
            "authentication_method": who.auth_method,
            "type": "OIDC client" if who.auth_method == "oidc" else "Client certificate",
            "id": who.id,
            "name": who.name or who.username,
            "groups": list(
                (state.identities.get((who.auth_method, who.id)) or {}).get("groups") or []
            ),
            "tls_certificate": who.certificate,
            "effective_groups": groups,
            "effective_permissions": permissions,
            "fine_grained": held is not None,
        }
    )


@router.post("/1.0/auth/identities/tls")
async def identities_tls_post(request: Request) -> Response:
    """A fine-grained TLS identity from a certificate (LXD's `lxc auth identity create
    tls/NAME CERT`), or a pending one and its token (`token: true`); an untrusted client
    shows that token as `trust_token` to become the identity (lxc 5.21's `lxc remote add
    NAME TOKEN`)."""
    body = await _body(request)
    if not identity(request).trusted:
        return await _redeem_pending(request, body)
    if body.get("trust_token"):
        raise Conflict("Client already trusted")
    if body.get("token") and body.get("certificate"):
        raise InvalidArgument("Can't use certificate if token is requested")
    if body.get("token"):
        return await _pending_tls_identity(request, body)
    fingerprint = await auth_records.create_tls_identity(
        context(request).store,
        str(body.get("name") or ""),
        str(body.get("certificate") or identity(request).certificate),
        body.get("groups") or [],
        request.client.host if request.client else "",
    )
    _changed(request)
    url = identity_url("tls", fingerprint)
    await context(request).lifecycle("identity-created", url, request=request)
    return responses.created(url)


async def _redeem_pending(request: Request, body: dict[str, Any]) -> Response:
    """LXD's createIdentityTLSUntrusted: the token only, the certificate the client
    connected with; the pending identity becomes that certificate's."""
    token = body.get("trust_token")
    if not token:
        raise PermissionDenied("Trust token required")
    if body.get("token") or body.get("certificate") or body.get("name") or body.get("groups"):
        raise PermissionDenied("Only trust token must be provided")
    if not identity(request).certificate:
        raise InvalidArgument("No client certificate provided")
    secret = trust_tokens.token_secret(token) if isinstance(token, str) else None
    if secret is None:
        raise PermissionDenied(NOT_AUTHORIZED)
    record = await trust_tokens.redeem(request, secret, pending_only=True)
    _changed(request)
    url = identity_url("tls", record["fingerprint"])
    await context(request).lifecycle("identity-updated", url, request=request)
    return responses.created(url)


async def _pending_tls_identity(request: Request, body: dict[str, Any]) -> Response:
    """A pending identity and the token (LXD's CertificateAddToken) that a client shows
    to become it: `lxc remote add NAME TOKEN` trusts its certificate as this identity."""
    store = context(request).store
    name = str(body.get("name") or "")
    if not name:
        raise InvalidArgument("Identity name must be provided")
    groups = await auth_records.check_groups_exist(store, body.get("groups") or [])
    await auth_records.check_identity_name_free(store, name)
    if not serving_address(request):
        raise InvalidArgument("Can't issue token when server isn't listening on network")
    operation = await trust_tokens.issue(context(request), serving_address(request), name,
                                         False, [])  # fmt: skip
    metadata = operation["metadata"]
    try:
        identifier = await auth_records.create_pending_tls_identity(
            store, name, groups, metadata["secret"], operation["id"]
        )
    except BaseException:
        with contextlib.suppress(CroftError):
            await context(request).operations.cancel(operation["id"], wait=0)
            await auth_call(
                AuthClient.revoke_token, auth_pb2.TokenSecret(secret=metadata["secret"])
            )
        raise
    _changed(request)
    url = identity_url("tls", identifier)
    await context(request).lifecycle("identity-created", url, request=request)
    token = {
        "client_name": name,
        "fingerprint": metadata["fingerprint"],
        "addresses": metadata["addresses"],
        "secret": metadata["secret"],
        "expires_at": "0001-01-01T00:00:00Z",
        "type": "Client certificate",
    }
    return responses.sync(token, location=url)


@router.get("/1.0/auth/identities/{method}")
async def identities_of_method(request: Request, method: str) -> Response:
    _check_method(method)
    found = await _identities(request, method)
    return responses.sync(
        query.listing(found, request, lambda i: identity_url(i["authentication_method"], i["id"]))
    )


async def _identity(request: Request, method: str, name_or_id: str) -> dict[str, Any]:
    _check_method(method)
    for found in await _identities(request, method):
        if name_or_id in (found["id"], found["name"]):
            return found
    raise NotFound("Identity not found")


@router.get("/1.0/auth/identities/{method}/{name_or_id}")
async def identity_get(request: Request, method: str, name_or_id: str) -> Response:
    found = await _identity(request, method, name_or_id)
    return responses.sync(found, etag=records.etag(found["groups"]))


@router.put("/1.0/auth/identities/{method}/{name_or_id}")
@router.patch("/1.0/auth/identities/{method}/{name_or_id}")
async def identity_put(request: Request, method: str, name_or_id: str) -> Response:
    """An identity's groups: replaced (PUT) or added to (PATCH). An OIDC user not seen
    yet is recorded by its subject, so that it may be put in groups before it logs in."""
    store = context(request).store
    body = await _body(request)
    groups = await auth_records.check_groups_exist(store, body.get("groups") or [])
    try:
        found = await _identity(request, method, name_or_id)
    except NotFound:
        if method != "oidc":
            raise
        found = {"id": name_or_id, "name": name_or_id, "groups": []}
    if request.method == "PATCH":
        groups = list(dict.fromkeys([*found["groups"], *groups]))
    await auth_records.set_identity_groups(store, method, found["id"], found["name"], groups)
    _changed(request)
    await context(request).lifecycle(
        "identity-updated", identity_url(method, found["id"]), request=request
    )
    return responses.empty_sync()


@router.delete("/1.0/auth/identities/{method}/{name_or_id}")
async def identity_delete(request: Request, method: str, name_or_id: str) -> Response:
    found = await _identity(request, method, name_or_id)
    if found["type"] == "Client certificate (pending)":
        # Its token goes with it: a token whose identity is gone must trust nobody.
        record = await context(request).store.get_json(identity_key(method, found["id"]))
        if record is not None and record[0].get("operation_id"):
            with contextlib.suppress(NotFound):
                await context(request).operations.cancel(record[0]["operation_id"], wait=0)
    elif method == "tls":
        if found["type"] != "Client certificate":
            raise InvalidArgument("TLS identities are removed through /1.0/certificates")
        await auth_call(
            AuthClient.delete_certificate, auth_pb2.CertificateRef(fingerprint=found["id"])
        )
        trust_cache.forget(found["id"])
    with contextlib.suppress(NotFound):
        await context(request).store.delete(identity_key(method, found["id"]))
    _changed(request)
    await context(request).lifecycle(
        "identity-deleted", identity_url(method, found["id"]), request=request
    )
    return responses.empty_sync()


# ---------------------------------------------------------------------------- identity provider groups


def _render_idp(record: dict[str, Any]) -> dict[str, Any]:
    return {"name": record["name"], "groups": record.get("groups") or []}


@router.get("/1.0/auth/identity-provider-groups")
async def idp_groups_list(request: Request) -> Response:
    everything = await auth_records.all_records(context(request).store)
    found = [
        _render_idp(record)
        for key, (record, _) in sorted(everything.items())
        if key.startswith(authz.IDP_GROUPS)
    ]
    return responses.sync(query.listing(found, request, lambda g: idp_group_url(g["name"])))


@router.post("/1.0/auth/identity-provider-groups")
async def idp_groups_post(request: Request) -> Response:
    store = context(request).store
    body = await _body(request)
    name = str(body.get("name", ""))
    if not name or "/" in name:
        raise InvalidArgument("Invalid identity provider group name")
    groups = await auth_records.check_groups_exist(store, body.get("groups") or [])
    try:
        await store.create_json(idp_group_key(name), {"name": name, "groups": groups})
    except Conflict:
        raise Conflict(f'Identity provider group "{name}" already exists') from None
    _changed(request)
    await context(request).lifecycle(
        "identity-provider-group-created", idp_group_url(name), request=request
    )
    return responses.created(idp_group_url(name))


@router.get("/1.0/auth/identity-provider-groups/{name}")
async def idp_group_get(request: Request, name: str) -> Response:
    record, _ = await auth_records.get_idp_group(context(request).store, name)
    rendered = _render_idp(record)
    return responses.sync(rendered, etag=records.etag(rendered["groups"]))


@router.put("/1.0/auth/identity-provider-groups/{name}")
@router.patch("/1.0/auth/identity-provider-groups/{name}")
async def idp_group_put(request: Request, name: str) -> Response:
    store = context(request).store
    record, revision = await auth_records.get_idp_group(store, name)
    groups = await auth_records.check_groups_exist(
        store, (await _body(request)).get("groups") or []
    )
    if request.method == "PATCH":
        groups = list(dict.fromkeys([*(record.get("groups") or []), *groups]))
    await store.update_json(idp_group_key(name), {**record, "groups": groups}, revision=revision)
    _changed(request)
    await context(request).lifecycle(
        "identity-provider-group-updated", idp_group_url(name), request=request
    )
    return responses.empty_sync()


@router.post("/1.0/auth/identity-provider-groups/{name}")
async def idp_group_rename(request: Request, name: str) -> Response:
    store = context(request).store
    record, revision = await auth_records.get_idp_group(store, name)
    new = str((await _body(request)).get("name", ""))
    if not new or "/" in new:
        raise InvalidArgument("Invalid identity provider group name")
    if await store.get(idp_group_key(new)) is not None:
        raise Conflict(f'Identity provider group "{new}" already exists')
    # In one transaction: never both names, never neither.
    await store.transaction([
        Create(idp_group_key(new), dump({**record, "name": new})),
        Delete(idp_group_key(name), revision=revision),
    ])  # fmt: skip
    _changed(request)
    await context(request).lifecycle("identity-provider-group-renamed", idp_group_url(new),
                                     request=request, context={"old_name": name})  # fmt: skip
    return responses.created(idp_group_url(new))


@router.delete("/1.0/auth/identity-provider-groups/{name}")
async def idp_group_delete(request: Request, name: str) -> Response:
    store = context(request).store
    _, revision = await auth_records.get_idp_group(store, name)
    await store.delete(idp_group_key(name), revision=revision)
    _changed(request)
    await context(request).lifecycle(
        "identity-provider-group-deleted", idp_group_url(name), request=request
    )
    return responses.empty_sync()


# ---------------------------------------------------------------------------- permissions


async def _entity_urls(request: Request, entity_type: str, project: str | None) -> list[str]:
    """The URLs of every entity of `entity_type` (in `project`, when given) there is."""
    store = context(request).store
    if entity_type == "server":
        return ["/1.0"]
    if entity_type == "project":
        entries = await store.list(records.project_key(""))
        return [
            f"/1.0/projects/{e.json()['name']}"
            for e in entries
            if project in (None, e.json()["name"])
        ]
    kinds = {"instance": "instances", "profile": "profiles", "network": "networks",
             "image": "images", "image_alias": "images/aliases"}  # fmt: skip
    kind = kinds.get(entity_type)
    if kind is None or entity_type not in PROJECT_SCOPED:
        return []
    urls = []
    for entry in await store.list(f"{records.RECORDS}{kind}/"):
        rest = entry.key.removeprefix(f"{records.RECORDS}{kind}/")
        owner, _, name = rest.partition("/")
        if not name or "/" in name or (project is not None and owner != project):
            continue
        if entity_type == "image":
            name = entry.json().get("fingerprint", name)
        urls.append(f"/1.0/{kind}/{name}?project={owner}")
    return urls


@router.get("/1.0/auth/permissions")
async def permissions_list(request: Request) -> Response:
    """Every entitlement there is to grant on every entity there is (LXD's list), by
    `entity-type` and `project` when asked; with recursion, the groups that hold each."""
    wanted = request.query_params.get("entity-type") or None
    project = request.query_params.get("project") or None
    if wanted is not None and wanted not in MODEL:
        raise InvalidArgument(f'Invalid entity type "{wanted}"')
    state = await context(request).authorizer.state()
    out: list[dict[str, Any]] = []
    for entity_type in [wanted] if wanted else sorted(MODEL):
        assert entity_type is not None
        for url in await _entity_urls(request, entity_type, project):
            for entitlement in entitlements_of(entity_type):
                permission: dict[str, Any] = {
                    "entity_type": entity_type, "url": url, "entitlement": entitlement,
                }  # fmt: skip
                if query.recursion(request) > 0:
                    permission["groups"] = sorted(
                        name
                        for name, group in state.groups.items()
                        if {**permission} in (group.get("permissions") or [])
                    )
                out.append(permission)
    return responses.sync(out)
