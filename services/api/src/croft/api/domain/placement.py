"""Which member's compute service gets a new instance.

Today the member with fewest instances; `--target`, member groups and placement
scriptlets belong here.
"""

from __future__ import annotations

from typing import Any

from croft.api import records
from croft.api.domain.instances import KIND
from croft.api.services import services
from croft.common.errors import CroftError
from croft.common.models import InstanceRecord


async def place(store: Any) -> str:
    """The member whose compute service gets a new instance: the one with fewest."""
    members = sorted({i.member for i in services().live("compute")})
    if not members:
        raise CroftError("No compute service is running")
    if len(members) == 1:
        return members[0]  # no need to count every instance
    counts = dict.fromkeys(members, 0)
    for entry in await store.list(records.RECORDS + f"{KIND}/"):
        member = InstanceRecord.meta_of(entry.json()).member
        if member in counts:
            counts[member] += 1
    return min(members, key=lambda m: (counts[m], m))
