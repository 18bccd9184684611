"""Cluster groups (LXD's `clustering_groups`): named sets of members that `--target @group`
places into and `scheduler.instance=group` members only take targeted instances from.

A group is `cluster/groups/<name>` (its description); its members are the members whose
record lists it in `groups`, so a member's groups and a group's members never disagree.
`default` always exists, may be neither renamed nor deleted, and every member starts in
it; a member always belongs to at least one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from croft.api import records
from croft.api.domain import cluster as members_domain
from croft.common import cluster
from croft.common.cluster import DEFAULT_GROUP, MemberRecord
from croft.common.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from croft.common.store import Store, dump

DEFAULT_DESCRIPTION = "Default cluster group"
LAST_GROUP = "Cluster members need to belong to at least one group"


@dataclass
class Group:
    name: str
    description: str = ""
    members: list[str] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "members": self.members}

    def etag(self) -> str:
        return records.etag([self.description, self.members])


def validate_name(name: str) -> None:
    """LXD's clusterGroupValidateName."""
    if name == "":
        raise InvalidArgument("No name provided")
    for bad, what in (("/", "slashes"), (" ", "spaces"), ("_", "underscores")):
        if bad in name:
            raise InvalidArgument(f"Cluster group names may not contain {what}")
    if "'" in name or '"' in name:
        raise InvalidArgument("Cluster group names may not contain quotes")
    if name == "*":
        raise InvalidArgument("Reserved cluster group name")
    if name in (".", ".."):
        raise InvalidArgument(f'Invalid cluster group name "{name}"')


async def groups(store: Store) -> list[Group]:
    """Every group, `default` first, then by name; members in member-id order."""
    found = {DEFAULT_GROUP: Group(DEFAULT_GROUP, DEFAULT_DESCRIPTION)}
    for entry in await store.list(cluster.GROUPS_PREFIX):
        data = entry.json()
        found[data["name"]] = Group(data["name"], data.get("description", ""))
    for member in await members_domain.members(store):
        for name in member.groups:
            if name in found:
                found[name].members.append(member.name)
    rest = sorted(n for n in found if n != DEFAULT_GROUP)
    return [found[DEFAULT_GROUP], *(found[n] for n in rest)]


async def group(store: Store, name: str) -> Group:
    for candidate in await groups(store):
        if candidate.name == name:
            return candidate
    raise NotFound("Cluster group not found")


async def exists(store: Store, name: str) -> bool:
    return name == DEFAULT_GROUP or await store.get(cluster.group_key(name)) is not None


async def check_groups_exist(store: Store, names: list[str]) -> None:
    """A member's new `groups`: each must exist (LXD's words when one does not)."""
    for name in names:
        if not await exists(store, name):
            raise NotFound(
                "Update cluster groups: Failed to add member to cluster group: "
                "Cluster group not found"
            )


async def _set_membership(store: Store, member: str, group_name: str, member_of: bool) -> None:
    def change(current: dict[str, Any]) -> dict[str, Any]:
        record = MemberRecord.load(current)
        if member_of and group_name not in record.groups:
            record.groups = [*record.groups, group_name]
        elif not member_of:
            record.groups = [g for g in record.groups if g != group_name]
        return record.dump()

    await records.modify(
        store, cluster.member_key(member), change, missing="Cluster member not found"
    )


async def _check_members(store: Store, names: list[str]) -> None:
    known = {m.name for m in await members_domain.members(store)}
    for name in names:
        if name not in known:
            raise NotFound("Cluster member not found")


async def create(store: Store, name: str, description: str, members: list[str]) -> None:
    validate_name(name)
    if await exists(store, name):
        raise Conflict("This cluster group already exists")
    await _check_members(store, members)
    await store.create(cluster.group_key(name), dump({"name": name, "description": description}))
    for member in members:
        await _set_membership(store, member, name, True)


async def update(
    store: Store, name: str, description: str | None, members: list[str] | None, patch: bool
) -> None:
    """PUT (`patch=False`) or PATCH of a group: its description, and who is in it. A
    member left out whose only group this is stays in it on a PUT (as LXD's) and is
    refused on a PATCH."""
    current = await group(store, name)
    if members is not None:
        await _check_members(store, members)
    by_name = {m.name: m for m in await members_domain.members(store)}
    leaving = [m for m in current.members if members is not None and m not in members]
    if patch:
        for member in leaving:
            if len(by_name[member].groups) == 1:
                raise InvalidArgument(
                    f"Cannot remove {member} from group as member needs to belong to at "
                    "least one group"
                )
    new_description = current.description if description is None else description
    if name != DEFAULT_GROUP or new_description != DEFAULT_DESCRIPTION:
        await store.put(
            cluster.group_key(name), dump({"name": name, "description": new_description})
        )
    for member in members or []:
        if member not in current.members:
            await _set_membership(store, member, name, True)
    for member in leaving:
        if len(by_name[member].groups) > 1:
            await _set_membership(store, member, name, False)


async def rename(store: Store, old: str, new: str) -> None:
    if old == DEFAULT_GROUP:
        raise PermissionDenied('The "default" group cannot be renamed')
    validate_name(new)
    current = await group(store, old)
    if await exists(store, new):
        raise Conflict(f'Name "{new}" already in use')
    await store.create(
        cluster.group_key(new), dump({"name": new, "description": current.description})
    )
    for member in current.members:

        def change(record_data: dict[str, Any]) -> dict[str, Any]:
            record = MemberRecord.load(record_data)
            record.groups = [new if g == old else g for g in record.groups]
            return record.dump()

        await records.modify(
            store, cluster.member_key(member), change, missing="Cluster member not found"
        )
    await store.delete(cluster.group_key(old))


async def delete(store: Store, name: str) -> None:
    if name == DEFAULT_GROUP:
        raise PermissionDenied("The 'default' cluster group cannot be deleted")
    current = await group(store, name)
    if current.members:
        raise InvalidArgument("Only empty cluster groups can be removed")
    await store.delete(cluster.group_key(name))
