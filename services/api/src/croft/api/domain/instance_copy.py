"""Instances made by copy (`lxc copy`, `POST /1.0/instances` with `source.type=copy`) and
moved to another storage pool (`lxc move --storage`, `POST /1.0/instances/NAME` with
`migration` and `pool`): LXD 5.0's merging of a copy's request with its source, and the
checks made before compute is asked, in LXD's words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from croft.api import limits, records
from croft.api.domain.instances import KIND, checked_expansion
from croft.common.errors import InvalidArgument, NotFound
from croft.common.models import InstanceRecord
from croft.common.records import DEFAULT_PROJECT

# The volatile keys a local copy keeps (LXD's shared.InstanceIncludeWhenCopying): the
# base image helps a later copy; every other volatile key is the instance's own.
KEPT_VOLATILE = frozenset({"volatile.base_image", "volatile.last_state.idmap"})
POOLS = "storage-pools"
# A copy of a big root volume, or a move between pools, may take long.
COPY_TIMEOUT = 3600.0
# LXD's message when a root disk names a pool that does not exist.
NO_POOL = (
    "Failed creating instance record: Failed initialising instance: "
    "Failed loading storage pool: Storage pool not found"
)


@dataclass(frozen=True)
class CopySource:
    """The instance (or snapshot) a copy is made of, as found in the store."""

    name: str
    snapshot: str
    record: dict[str, Any]  # the instance's
    state: dict[str, Any]  # what is copied: the instance's record, or the snapshot's

    @property
    def url(self) -> str:
        return f"/1.0/instances/{self.name}" + (f"/{self.snapshot}" if self.snapshot else "")


def copied_config(source: dict[str, str], requested: dict[str, str] | None) -> dict[str, str]:
    """The copy's config: the request's, and the source's keys it does not name, but the
    source's volatile keys (LXD keeps only those in KEPT_VOLATILE)."""
    config = dict(requested or {})
    for key, value in source.items():
        if key.startswith("volatile.") and key not in KEPT_VOLATILE:
            continue
        config.setdefault(key, value)
    return {k: v for k, v in config.items() if v != ""}


async def find_source(store: Any, project: str, source: str) -> CopySource:
    """The instance or snapshot `source` ("c1" or "c1/snap0") names; LXD's refusals."""
    if not source:
        raise InvalidArgument("Must specify a source instance")
    name, _, snapshot = source.partition("/")
    found = await store.get_json(records.record_key(KIND, project, name))
    if found is None or InstanceRecord.meta_of(found[0]).creating:
        raise NotFound(
            f'Failed to fetch instance "{name}" in project "{project}": Instance not found'
        )
    record: dict[str, Any] = found[0]
    state = record
    if snapshot:
        snap = await store.get_json(
            records.record_key("instance-snapshots", project, f"{name}/{snapshot}")
        )
        if snap is None:
            raise NotFound(
                f'Failed to fetch snapshot "{snapshot}" of instance "{name}" in project '
                f'"{project}": InstanceSnapshot not found'
            )
        state = snap[0]
    return CopySource(name, snapshot, record, state)


async def require_pool(store: Any, pool: str) -> None:
    """NotFound, in LXD's words, for a storage pool that does not exist."""
    if not pool or await store.get(records.record_key(POOLS, DEFAULT_PROJECT, pool)) is None:
        raise NotFound(NO_POOL)


async def copy_record(
    store: Any,
    project: str,
    name: str,
    source: CopySource,
    *,
    config: dict[str, str] | None,
    devices: dict[str, Any] | None,
    profiles: list[str] | None,
    description: str,
    ephemeral: bool,
) -> InstanceRecord:
    """The new instance's record, as LXD 5.0 makes a copy's: the request's config and
    devices over the source's own, the source's profiles unless the request names some,
    the source's type and architecture; expanded and checked as a create's."""
    state = source.state
    config = copied_config(state.get("config") or {}, config)
    devices = {**(state.get("devices") or {}), **(devices or {})}
    profiles = list(state.get("profiles") or []) if profiles is None else list(profiles)
    expanded_config, expanded_devices, root = await checked_expansion(
        store, project, profiles, config, devices
    )
    await require_pool(store, root.get("pool", ""))
    record = InstanceRecord(
        name=name,
        project=project,
        type=source.record.get("type") or "container",
        description=description,
        architecture=state.get("architecture") or source.record.get("architecture") or "",
        config=config,
        devices=devices,
        profiles=profiles,
        ephemeral=ephemeral,
        stateful=False,
        expanded_config=expanded_config,
        expanded_devices=expanded_devices,
    )
    limits.check_device_paths(expanded_devices)
    limits.check_record(record.dump(), "instance")
    return record


def copy_resources(name: str, source: CopySource, project: str) -> dict[str, list[str]]:
    """An operation's resources, as LXD lists a copy's: the new instance and its source."""
    urls = [records.url(KIND, name, project), _with_project(source.url, project)]
    return {"containers": [u.replace("/1.0/instances/", "/1.0/containers/") for u in urls]} | {
        "instances": urls
    }


def _with_project(url: str, project: str) -> str:
    return url if project == DEFAULT_PROJECT else f"{url}?project={project}"
