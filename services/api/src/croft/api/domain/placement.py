"""Which member's compute service gets a new instance.

Standalone: the one member. In a cluster (as LXD 5.0's `GetNodeWithLeastInstances`):
`?target=MEMBER` names it (404 "Cluster member not found" for no such member, refused
when it is offline or runs no compute); otherwise the member with the fewest instances
among the online ones that run compute and whose `scheduler.instance` is not `manual`,
ties going to the lowest member id. `?target=@GROUP` picks among that group's members the
same way (members with `scheduler.instance=group` only take instances targeted at one of
their groups). Placement scriptlets belong here.
"""

from __future__ import annotations

from typing import Any

from croft.api import records
from croft.api.domain import cluster, cluster_groups
from croft.api.domain.instances import KIND
from croft.api.services import services
from croft.common.errors import (
    CroftError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from croft.common.models import InstanceRecord


async def place(store: Any, target: str = "") -> str:
    """The member whose compute service gets a new instance."""
    live = {i.member for i in services().live("compute")}
    clustered = await cluster.enabled(store)
    if target and not clustered:
        raise InvalidArgument("Target only allowed when clustered")
    if not clustered:
        members = sorted(live)
        if not members:
            raise CroftError("No compute service is running")
        if len(members) == 1:
            return members[0]  # no need to count every instance
        return await _fewest(store, members)
    views = await cluster.views(store)
    group = ""
    if target.startswith("@"):
        group = target[1:]
        if not await cluster_groups.exists(store, group):
            raise InvalidArgument(f'Cluster group "{group}" doesn\'t exist')
        target = ""
    if target:
        found = [v for v in views if v.record.name == target]
        if not found:
            raise NotFound("Cluster member not found")
        if not found[0].online:
            raise Unavailable(f'Cluster member "{target}" is offline')
        if found[0].evacuated:
            raise PermissionDenied("Cluster member is evacuated")
        if target not in live:
            raise Unavailable(f'Cluster member "{target}" runs no compute service')
        return target
    candidates = [
        v.record.name
        for v in views
        if v.online
        and not v.evacuated
        and v.record.name in live
        and _takes_untargeted(v.record.config.get("scheduler.instance", "all"), group, v)
        and (not group or group in v.record.groups)
    ]
    if not candidates:
        raise CroftError("No suitable cluster member could be found")
    return await _fewest(store, candidates)


def _takes_untargeted(scheduler: str, group: str, view: cluster.MemberView) -> bool:
    """LXD's GetCandidateMembers: `manual` members take only instances targeted at them;
    `group` ones only those targeted at one of their groups."""
    if scheduler == "manual":
        return False
    if scheduler == "group":
        return group in view.record.groups
    return True


async def _fewest(store: Any, members: list[str]) -> str:
    """The member with the fewest instances; the first in `members` on a tie."""
    counts = dict.fromkeys(members, 0)
    for entry in await store.list(records.RECORDS + f"{KIND}/"):
        member = InstanceRecord.meta_of(entry.json()).member
        if member in counts:
            counts[member] += 1
    order = {m: i for i, m in enumerate(members)}
    return min(members, key=lambda m: (counts[m], order[m]))
