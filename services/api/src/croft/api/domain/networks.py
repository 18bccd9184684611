"""What the network handlers share: a managed network's record, what uses it (LXD's
`used_by` and `IsUsed`), and the member whose network service answers for it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from croft.api import records
from croft.api.context import context
from croft.api.domain import projects
from croft.common.errors import InvalidArgument, NotFound
from croft.common.models import InstanceRecord, NetworkMember, NetworkRecord, ProfileRecord
from croft.common.records import (
    DEFAULT_PROJECT,
    RECORDS,
    network_member_prefix,
    network_nic_prefix,
    network_used_by,
    record_prefix,
)


def on_network(device: dict[str, str], network: str) -> bool:
    """Whether a device is a NIC on `network` (LXD's isInUseByDevice)."""
    return device.get("type") == "nic" and network in (device.get("network"), device.get("parent"))


async def check_nic_macs(
    store: Any,
    project: str,
    instance: str,
    devices: dict[str, dict[str, str]],
    before: dict[str, dict[str, str]] | None = None,
) -> None:
    """LXD's check that no other instance's NIC on the same managed network has the MAC
    address a NIC of `instance` sets (`hwaddr` in the expanded `devices`; `before`,
    the instance's devices until now, say whether the device is added or updated).
    InvalidArgument in LXD's words."""
    wanted = {
        (d["network"], d["hwaddr"].lower()): name
        for name, d in devices.items()
        if d.get("type") == "nic" and d.get("network") and d.get("hwaddr")
    }
    if not wanted:
        return
    for entry in await store.list(records.record_prefix("instances", project)):
        other = InstanceRecord.model_validate(entry.json())
        if other.name == instance:
            continue
        for device in other.expanded_devices.values():
            if device.get("type") != "nic" or not device.get("hwaddr"):
                continue
            name = wanted.get((device.get("network", ""), device["hwaddr"].lower()))
            if name is not None:
                verb = "update" if before is not None and name in before else "add"
                raise InvalidArgument(
                    f'Failed {verb} validation for device "{name}": MAC address '
                    f'"{devices[name]["hwaddr"]}" already defined on another NIC'
                )


async def networks(store: Any) -> list[NetworkRecord]:
    """Every managed network's record."""
    entries = await store.list(record_prefix(NetworkRecord.collection, DEFAULT_PROJECT))
    return [NetworkRecord.model_validate(entry.json()) for entry in entries]


async def used_by(store: Any, name: str, known: list[NetworkRecord] | None = None) -> list[str]:
    """What uses a managed network, in LXD's order: networks built on it, profiles with a
    NIC on it, then the instances whose NICs are attached to it (`known`: every managed
    network's record, when the caller has read them)."""
    if known is None:
        known = await networks(store)
    # A network's `parent` is a member's own key: read from the member keys too.
    members = RECORDS + "network-members/"
    built_on = {
        entry.key.removeprefix(members).split("/")[0]
        for entry in await store.list(members)
        if NetworkMember.model_validate(entry.json()).config.get("parent") == name
    }
    others = sorted(
        records.url("networks", other.name)
        for other in known
        if other.name != name
        and (
            other.name in built_on
            or name in (other.config.get("network"), other.config.get("parent"))
        )
    )
    profiles = []
    prefix = records.RECORDS + "profiles/"
    for entry in await store.list(prefix):
        # The project is in the profile's key, not its record.
        project, _, profile = entry.key.removeprefix(prefix).partition("/")
        devices = ProfileRecord.model_validate(entry.json()).devices
        if any(on_network(device, name) for device in devices.values()):
            profiles.append(records.url("profiles", profile, project))
    nics = [entry.key for entry in await store.list(network_nic_prefix(name))]
    return others + sorted(profiles) + network_used_by(name, nics)


async def find(store: Any, name: str) -> NetworkRecord | None:
    """A managed network's cluster-wide record, None when there is none."""
    found = await store.get_json(NetworkRecord.store_key(name))
    return None if found is None else NetworkRecord.model_validate(found[0])


async def managed(store: Any, name: str, missing: str = "Network not found") -> NetworkRecord:
    """A managed network's cluster-wide record; NotFound(`missing`) when there is none."""
    record = await find(store, name)
    if record is None:
        raise NotFound(missing)
    return record


async def member_entries(store: Any, name: str) -> dict[str, NetworkMember]:
    """Each member's key of a network: its state and its member-specific config."""
    prefix = network_member_prefix(name)
    return {
        entry.key.removeprefix(prefix): NetworkMember.model_validate(entry.json())
        for entry in await store.list(prefix)
    }


async def member_states(store: Any, name: str) -> dict[str, str]:
    """Each member's state of a network (`pending`, `created`, `errored`)."""
    return {member: entry.state for member, entry in (await member_entries(store, name)).items()}


async def with_member_config(
    request: Request, store: Any, record: NetworkRecord, member: str = ""
) -> dict[str, str]:
    """The record's config with a member's own keys (`parent`...), as LXD shows it: the
    member asked for (`?target=`), else, on a server that is not clustered, its only
    member; a cluster without a target shows the cluster-wide keys alone."""
    member = member or request.query_params.get("target", "")
    entries = await member_entries(store, record.name)
    if not member and context(request).settings.location == "none" and len(entries) == 1:
        member = next(iter(entries))
    own = entries[member].config if member in entries else {}
    return {**record.config, **own}


async def member_of(request: Request, store: Any, name: str, record: NetworkRecord) -> str:
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
    return record.croft.member or context(request).settings.server_name


async def in_default(request: Request) -> bool:
    """Whether `?project=` names default's networks: default, or a project without
    `features.networks`. croft's networks are all default's (a project of its own
    networks has none yet); NotFound for a project that does not exist."""
    return await projects.scope(request, "networks") == records.DEFAULT_PROJECT


async def require_in_default(request: Request) -> None:
    if not await in_default(request):
        raise NotFound("Network not found")
