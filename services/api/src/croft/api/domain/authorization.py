"""The auth records behind `/1.0/auth/...`: groups, identities' memberships, identity
provider groups, each checked and written here; `croft.api.authz` reads them.

A group's record holds its name, description and permissions; who is in it is kept on
the identities (`groups`) and on the identity provider groups, and shown on the group as
LXD does (`identities`, `identity_provider_groups`). A rename or delete of a group
rewrites them, in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from croft.api.auth import auth_call, trust_cache
from croft.api.authz import (
    AUTH_PREFIX,
    IDENTITIES,
    IDP_GROUPS,
    group_key,
    identity_key,
    idp_group_key,
)
from croft.api.entitlements import check_entitlement, parse_entity
from croft.api.tls import certificate_fingerprint
from croft.common.clients import AuthClient
from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.revert import Reverter
from croft.common.store import Create, Delete, Operation, Store, Update, dump
from croft.v1 import auth_pb2, common_pb2


def check_group_name(name: str) -> None:
    """LXD's group name rules, in its words."""
    if not name:
        raise InvalidArgument("Group name cannot be empty")
    if "/" in name:
        raise InvalidArgument("Group name cannot contain a forward slash")
    if ":" in name:
        raise InvalidArgument("Group name cannot contain a colon")


def check_permissions(permissions: Any) -> list[dict[str, str]]:
    """The permissions, each checked (entity type, URL, entitlement) and its URL made
    canonical; InvalidArgument in LXD's words for the first that is not."""
    if not isinstance(permissions, list):
        raise InvalidArgument("Invalid request body: permissions must be a list")
    out: list[dict[str, str]] = []
    for permission in permissions:
        if not isinstance(permission, dict):
            raise InvalidArgument("Invalid request body: a permission must be an object")
        entity_type = str(permission.get("entity_type", ""))
        url = str(permission.get("url", ""))
        entitlement = str(permission.get("entitlement", ""))
        entity = parse_entity(entity_type, url)
        try:
            check_entitlement(entity_type, entitlement)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f'Failed validating group permission with entity reference "{url}" and '
                f'entitlement "{entitlement}": {exc.message}'
            ) from None
        canonical = {"entity_type": entity_type, "url": entity.url, "entitlement": entitlement}
        if canonical not in out:
            out.append(canonical)
    return out


async def all_records(store: Store) -> dict[str, tuple[dict[str, Any], int]]:
    return {e.key: (e.json(), e.revision) for e in await store.list(AUTH_PREFIX)}


def render_group(
    record: dict[str, Any], everything: dict[str, tuple[dict[str, Any], int]]
) -> dict[str, Any]:
    """LXD's AuthGroup: the record, with who is in it."""
    name = record["name"]
    identities: dict[str, list[str]] = {}
    idp: list[str] = []
    for key, (other, _) in sorted(everything.items()):
        if key.startswith(IDENTITIES) and name in (other.get("groups") or []):
            method, _, identifier = key.removeprefix(IDENTITIES).partition("/")
            identities.setdefault(method, []).append(identifier)
        elif key.startswith(IDP_GROUPS) and name in (other.get("groups") or []):
            idp.append(other["name"])
    return {
        "name": name,
        "description": record.get("description", ""),
        "permissions": record.get("permissions") or [],
        "identities": identities,
        "identity_provider_groups": idp,
    }


async def get_group(store: Store, name: str) -> tuple[dict[str, Any], int]:
    found = await store.get_json(group_key(name))
    if found is None:
        raise NotFound("Group not found")
    return found[0], found[1]


async def create_group(store: Store, name: str, description: str, permissions: Any) -> None:
    check_group_name(name)
    record = {"name": name, "description": description,
              "permissions": check_permissions(permissions or [])}  # fmt: skip
    try:
        await store.create_json(group_key(name), record)
    except Conflict:
        raise Conflict(f'Group "{name}" already exists') from None


async def check_groups_exist(store: Store, groups: Any) -> list[str]:
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise InvalidArgument("Invalid request body: groups must be a list of names")
    for name in groups:
        if await store.get(group_key(name)) is None:
            raise NotFound(f'Failed to add identity to group "{name}": Group not found')
    return list(dict.fromkeys(groups))


def _without(record: dict[str, Any], name: str, new: str | None) -> dict[str, Any]:
    groups = [new if g == name else g for g in record.get("groups") or [] if new or g != name]
    return {**record, "groups": [g for g in groups if g]}


async def rename_or_delete_group(store: Store, name: str, new: str | None) -> None:
    """The group gone (`new` None) or renamed, and every membership and mapping of it
    rewritten, in one transaction."""
    everything = await all_records(store)
    key = group_key(name)
    if key not in everything:
        raise NotFound("Group not found")
    record, revision = everything[key]
    ops: list[Operation] = [Delete(key, revision=revision)]
    if new is not None:
        check_group_name(new)
        if group_key(new) in everything:
            raise Conflict(f'Group "{new}" already exists')
        ops.append(Create(group_key(new), dump({**record, "name": new})))
    for other_key, (other, other_revision) in everything.items():
        if other_key.startswith((IDENTITIES, IDP_GROUPS)) and name in (other.get("groups") or []):
            ops.append(Update(other_key, dump(_without(other, name, new)), other_revision))
    await store.transaction(ops)


def identity_record(method: str, identifier: str, name: str, groups: list[str]) -> dict[str, Any]:
    return {"authentication_method": method, "id": identifier, "name": name, "groups": groups}


async def set_identity_groups(
    store: Store, method: str, identifier: str, name: str, groups: list[str]
) -> None:
    key = identity_key(method, identifier)
    found = await store.get_json(key)
    record = identity_record(method, identifier, name, groups)
    if found is None:
        await store.create_json(key, record)
    else:
        await store.update_json(key, {**found[0], "groups": groups}, revision=found[1])


async def get_idp_group(store: Store, name: str) -> tuple[dict[str, Any], int]:
    found = await store.get_json(idp_group_key(name))
    if found is None:
        raise NotFound("Identity provider group not found")
    return found[0], found[1]


async def create_tls_identity(
    store: Store, name: str, certificate: str, groups: Any, address: str
) -> str:
    """LXD's `POST /1.0/auth/identities/tls` with a certificate: trust it (the auth
    service's trust store) as a fine-grained identity, held to its groups' grants even
    while in none, unlike a certificate added with `lxc config trust add`. Returns its
    fingerprint; nothing is left behind when a step fails."""
    if not name:
        raise InvalidArgument("Identity name must be provided")
    if not certificate:
        raise InvalidArgument("No client certificate provided")
    groups = await check_groups_exist(store, groups)
    listed = await auth_call(AuthClient.list_certificates, common_pb2.Empty())
    if any(c.get("name") == name for c in json.loads(listed.json)):
        raise Conflict(f'An identity with name "{name}" already exists')
    async with Reverter() as revert:
        try:
            reply = await auth_call(
                AuthClient.add_certificate,
                auth_pb2.AddCertificateRequest(
                    certificate=certificate, name=name, type="client", address=address
                ),
                idempotent=False,
            )
        except Conflict:
            raise Conflict("Identity already exists") from None
        fingerprint = str(json.loads(reply.json)["fingerprint"])

        async def untrust() -> None:
            await auth_call(
                AuthClient.delete_certificate, auth_pb2.CertificateRef(fingerprint=fingerprint)
            )
            trust_cache.forget(fingerprint)

        revert.add(untrust)
        record = {**identity_record("tls", fingerprint, name, groups), "fine_grained": True}
        # Replaces what a certificate of this fingerprint may once have left.
        await store.put(identity_key("tls", fingerprint), dump(record))
        revert.success()
    trust_cache.forget(fingerprint)
    return fingerprint


def _token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def check_identity_name_free(store: Store, name: str) -> None:
    """LXD's 409 when a TLS identity (trusted or pending) already has `name`."""
    listed = await auth_call(AuthClient.list_certificates, common_pb2.Empty())
    taken = {c.get("name") for c in json.loads(listed.json)}
    taken |= {e.json().get("name") for e in await store.list(identity_key("tls", ""))}
    if name in taken:
        raise Conflict(f'An identity with name "{name}" already exists')


async def create_pending_tls_identity(
    store: Store, name: str, groups: list[str], secret: str, operation_id: str
) -> str:
    """A pending fine-grained TLS identity (LXD's "Client certificate (pending)"): its
    name and groups, waiting for a client to show the token whose secret is `secret`.
    Returns its identifier (a UUID, as LXD's)."""
    identifier = str(uuid.uuid4())
    record = {**identity_record("tls", identifier, name, groups), "fine_grained": True,
              "pending": True, "token_sha256": _token_hash(secret),
              "operation_id": operation_id}  # fmt: skip
    await store.create_json(identity_key("tls", identifier), record)
    return identifier


async def pending_for_token(store: Store, secret: str) -> tuple[str, dict[str, Any]] | None:
    """The pending TLS identity the token with `secret` was issued for, if any."""
    wanted = _token_hash(secret)
    for entry in await store.list(identity_key("tls", "")):
        record = entry.json()
        if record.get("pending") and record.get("token_sha256") == wanted:
            return entry.key, record
    return None


async def prepare_tls_identity(store: Store, certificate: str, pending: dict[str, Any]) -> str:
    """The record of the certificate about to be trusted on a pending identity's token:
    fine-grained, with the pending identity's name and groups. Returns its key ("" when
    the certificate has a record already: it is trusted already, and the trust will be
    refused as a conflict)."""
    try:
        fingerprint = certificate_fingerprint(certificate)
    except ValueError:
        return ""  # not a certificate: the auth service refuses it
    key = identity_key("tls", fingerprint)
    record = {**identity_record("tls", fingerprint, pending.get("name", ""),
                                list(pending.get("groups") or [])), "fine_grained": True}  # fmt: skip
    try:
        await store.create_json(key, record)
    except Conflict:
        return ""
    return key
