"""What the network ACL and forward handlers share: the ACL records of a project, what
uses an ACL (LXD's `used_by`), and asking the network services to enforce a change on
every network it reaches (undone when one of them refuses it)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from croft.api import records
from croft.api.domain.networks import member_states, networks
from croft.api.services import services
from croft.common.errors import CroftError, NotFound
from croft.common.models import InstanceRecord, ProfileRecord
from croft.common.network_acl import Acl, acl_key, acl_names, acl_prefix
from croft.common.records import DEFAULT_PROJECT
from croft.common.store import Store, Update, dump
from croft.v1 import network_pb2


async def acls(store: Store, project: str) -> list[tuple[Acl, int]]:
    """A project's ACLs and their revisions, by name."""
    found = [
        (Acl.from_record(entry.json()), entry.revision)
        for entry in await store.list(acl_prefix(project))
    ]
    return sorted(found, key=lambda item: item[0].name)


async def acl(store: Store, project: str, name: str) -> tuple[Acl, int]:
    """One ACL and its revision; NotFound in LXD's words."""
    found = await store.get(acl_key(project, name))
    if found is None:
        raise NotFound("Network ACL not found")
    return Acl.from_record(found.json()), found.revision


def _uses(config: dict[str, str], name: str) -> bool:
    return name in acl_names(config)


async def networks_using(store: Store, name: str) -> list[str]:
    """The managed networks whose `security.acls` names ACL `name` (networks are in the
    default project: only its ACLs can be named)."""
    return sorted(r.name for r in await networks(store) if _uses(r.config, name))


async def networks_reached(store: Store, name: str) -> list[str]:
    """The networks a change to ACL `name` (of the default project) reaches: those
    naming it, and those of instance NICs naming it (OVN NICs' own ACLs)."""
    found = set(await networks_using(store, name))
    for entry in await store.list(records.record_prefix("instances", DEFAULT_PROJECT)):
        instance = InstanceRecord.model_validate(entry.json())
        for device in {**instance.expanded_devices, **instance.devices}.values():
            if device.get("type") == "nic" and device.get("network") and _uses(device, name):
                found.add(device["network"])
    return sorted(found)


async def used_by(store: Store, project: str, name: str) -> list[str]:
    """LXD's `used_by` of an ACL: networks, then profiles and instances with a NIC that
    names it in `security.acls`."""
    urls: list[str] = []
    if project == DEFAULT_PROJECT:
        urls += [records.url("networks", n) for n in await networks_using(store, name)]
    for entry in await store.list(records.record_prefix("profiles", project)):
        profile = ProfileRecord.model_validate(entry.json())
        if any(_uses(d, name) for d in profile.devices.values() if d.get("type") == "nic"):
            urls.append(records.url("profiles", profile.name, project))
    for entry in await store.list(records.record_prefix("instances", project)):
        instance = InstanceRecord.model_validate(entry.json())
        if any(_uses(d, name) for d in instance.devices.values() if d.get("type") == "nic"):
            urls.append(records.url("instances", instance.name, project))
    return urls


async def apply_to_networks(store: Store, names: Iterable[str]) -> None:
    """Ask every member of each network to enforce what the store now says (its ACLs,
    its forwards). Raises the first refusal after asking the rest."""
    first: CroftError | None = None
    for name in names:
        for member, state in sorted((await member_states(store, name)).items()):
            if state != "created":
                continue
            try:
                client = await services().network(member)
                await client.apply_security(network_pb2.NetworkRef(name=name), timeout=60)
            except CroftError as exc:
                first = first or exc
    if first is not None:
        raise first


async def update_then_apply(
    store: Store,
    key: str,
    old: dict[str, Any],
    new: dict[str, Any],
    revision: int,
    networks_reached: Iterable[str],
) -> None:
    """`change_then_apply` of the record at `key`, read as `old` at `revision`, updated to
    `new` (and back to `old` on a refusal)."""
    written: dict[str, int] = {}

    async def write() -> None:
        written["revision"] = await store.transaction([Update(key, dump(new), revision)])

    async def undo() -> None:
        await store.transaction([Update(key, dump(old), written["revision"])])

    await change_then_apply(store, write, undo, networks_reached)


async def change_then_apply(
    store: Store,
    write: Callable[[], Awaitable[Any]],
    undo: Callable[[], Awaitable[Any]],
    networks_reached: Iterable[str],
) -> None:
    """Write a change, then enforce it on the networks it reaches; if one refuses it,
    undo the write, enforce the old state again and raise the refusal (LXD's revert)."""
    names = list(networks_reached)
    await write()
    try:
        await apply_to_networks(store, names)
    except CroftError:
        await undo()
        with contextlib.suppress(CroftError):
            await apply_to_networks(store, names)
        raise
