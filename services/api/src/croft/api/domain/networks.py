"""What the network handlers share: a managed network's record, what uses it (LXD's
`used_by` and `IsUsed`), and the member whose network service answers for it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from croft.api import records
from croft.api.context import context
from croft.common.errors import NotFound
from croft.common.records import (
    DEFAULT_PROJECT,
    RECORDS,
    network_member_prefix,
    network_nic_prefix,
    network_used_by,
)


def on_network(device: dict[str, str], network: str) -> bool:
    """Whether a device is a NIC on `network` (LXD's isInUseByDevice)."""
    return device.get("type") == "nic" and network in (device.get("network"), device.get("parent"))


async def used_by(store: Any, name: str) -> list[str]:
    """What uses a managed network, in LXD's order: networks built on it, profiles with a
    NIC on it, then the instances whose NICs are attached to it."""
    # A network's `parent` is a member's own key: read from the member keys too.
    members = RECORDS + "network-members/"
    built_on = {
        entry.key.removeprefix(members).split("/")[0]
        for entry in await store.list(members)
        if (entry.json().get("config") or {}).get("parent") == name
    }
    networks = sorted(
        records.url("networks", r["name"])
        for r in await records.list_records(store, "networks", DEFAULT_PROJECT)
        if r["name"] != name
        and (
            r["name"] in built_on
            or name
            in ((r.get("config") or {}).get("network"), (r.get("config") or {}).get("parent"))
        )
    )
    profiles = []
    prefix = records.RECORDS + "profiles/"
    for entry in await store.list(prefix):
        project, _, profile = entry.key.removeprefix(prefix).partition("/")
        if any(on_network(device, name) for device in (entry.json().get("devices") or {}).values()):
            profiles.append(records.url("profiles", profile, project))
    nics = [entry.key for entry in await store.list(network_nic_prefix(name))]
    return networks + sorted(profiles) + network_used_by(name, nics)


async def managed(store: Any, name: str, missing: str = "Network not found") -> dict[str, Any]:
    """A managed network's cluster-wide record; NotFound(`missing`) when there is none."""
    found = await store.get_json(records.record_key("networks", DEFAULT_PROJECT, name))
    if found is None:
        raise NotFound(missing)
    record: dict[str, Any] = found[0]
    return record


async def member_states(store: Any, name: str) -> dict[str, str]:
    """Each member's state of a network (`pending`, `created`, `errored`)."""
    prefix = network_member_prefix(name)
    return {
        entry.key.removeprefix(prefix): str(entry.json().get("state", ""))
        for entry in await store.list(prefix)
    }


async def with_member_config(
    request: Request, store: Any, record: dict[str, Any], member: str = ""
) -> dict[str, Any]:
    """The record's config with a member's own keys (`parent`...), as LXD shows it: the
    member asked for (`?target=`), else, on a server that is not clustered, its only
    member; a cluster without a target shows the cluster-wide keys alone."""
    member = member or request.query_params.get("target", "")
    prefix = network_member_prefix(record["name"])
    entries = {e.key.removeprefix(prefix): e.json() for e in await store.list(prefix)}
    if not member and context(request).settings.location == "none" and len(entries) == 1:
        member = next(iter(entries))
    own = (entries.get(member) or {}).get("config") or {}
    return {**(record.get("config") or {}), **own}


async def member_of(request: Request, store: Any, name: str, record: dict[str, Any]) -> str:
    """The member whose network service answers for a network: LXD's `?target=`, else
    the first member it is created on (records from before the cluster shape name their
    one member)."""
    created = sorted(
        m for m, state in (await member_states(store, name)).items() if state == "created"
    )
    target = request.query_params.get("target")
    if target:
        if target not in created:
            raise NotFound(f'Network "{name}" is not set up on member "{target}"')
        return target
    if created:
        return created[0]
    return str(record.get("_croft", {}).get("member", "")) or context(request).settings.server_name
