"""Which member's compute service gets a new instance.

Standalone: the one member. In a cluster (as LXD 5.0's `GetNodeWithLeastInstances`):
`?target=MEMBER` names it (404 "Cluster member not found" for no such member, refused
when it is offline or runs no compute); otherwise the member with the fewest instances
among the online ones that run compute and whose `scheduler.instance` is not `manual`,
ties going to the lowest member id. Cluster groups and placement scriptlets belong here.
"""

from __future__ import annotations

from typing import Any

from croft.api import records
from croft.api.domain import cluster
from croft.api.domain.instances import KIND
from croft.api.services import services
from croft.common.errors import CroftError, InvalidArgument, NotFound, Unavailable
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
    if target:
        if target.startswith("@"):
            raise InvalidArgument(f'Cluster group "{target[1:]}" doesn\'t exist')
        found = [v for v in views if v.record.name == target]
        if not found:
            raise NotFound("Cluster member not found")
        if not found[0].online:
            raise Unavailable(f'Cluster member "{target}" is offline')
        if target not in live:
            raise Unavailable(f'Cluster member "{target}" runs no compute service')
        return target
    candidates = [
        v.record.name
        for v in views
        if v.online
        and v.record.name in live
        and v.record.config.get("scheduler.instance", "all") != "manual"
    ]
    if not candidates:
        raise CroftError("No suitable cluster member could be found")
    return await _fewest(store, candidates)


async def _fewest(store: Any, members: list[str]) -> str:
    """The member with the fewest instances; the first in `members` on a tie."""
    counts = dict.fromkeys(members, 0)
    for entry in await store.list(records.RECORDS + f"{KIND}/"):
        member = InstanceRecord.meta_of(entry.json()).member
        if member in counts:
            counts[member] += 1
    order = {m: i for i, m in enumerate(members)}
    return min(members, key=lambda m: (counts[m], order[m]))
