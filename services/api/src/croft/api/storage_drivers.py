"""Which storage drivers this cluster runs: what the live storage services report, for
`/1.0`'s `storage`, `storage_version` and `storage_supported_drivers`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from croft.api.services import services
from croft.common.errors import CroftError
from croft.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageDriverInfo:
    """A storage driver as a live storage service reports it (`/1.0`'s
    `storage_supported_drivers`)."""

    name: str
    version: str
    remote: bool


# The live storage services' ids when their drivers were last asked, and the answer:
# `GET /1.0` comes with every `lxc` command, the drivers change only with the services.
_drivers_seen: tuple[frozenset[str], list[StorageDriverInfo]] | None = None


async def storage_drivers() -> list[StorageDriverInfo]:
    """The drivers the live storage services run, one entry per name, sorted; asked of
    the services again when the set of live ones changes. None live: none."""
    global _drivers_seen
    try:
        found = services()
    except CroftError:
        return []  # an api without the other services (a test replica)
    await found.watch("storage")
    live = found.live("storage")
    ids = frozenset(i.id for i in live)
    if _drivers_seen is not None and _drivers_seen[0] == ids:
        return _drivers_seen[1]
    drivers: dict[str, StorageDriverInfo] = {}
    complete = True
    for member in sorted({i.member for i in live}):
        try:
            client = await found.storage(member)
            reply = await client.storage_drivers(common_pb2.Empty(), timeout=10)
        except CroftError as exc:
            log.warning("storage on %s did not list its drivers: %s", member, exc)
            complete = False
            continue
        for driver in reply.drivers:
            drivers.setdefault(
                driver.name, StorageDriverInfo(driver.name, driver.version, driver.remote)
            )
    result = sorted(drivers.values(), key=lambda d: d.name)
    if complete:
        _drivers_seen = (ids, result)
    return result


__all__ = ["StorageDriverInfo", "storage_drivers"]
