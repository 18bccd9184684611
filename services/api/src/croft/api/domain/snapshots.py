"""Instance snapshots: their records and rendering (shown in an instance, a listing and
the snapshot routes), and restoring one, which is a PUT of the instance with `restore`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from croft.api import records
from croft.api.context import context
from croft.api.domain.compute import compute_operation
from croft.common.errors import NotFound
from croft.common.models import InstanceRecord
from croft.common.records import public
from croft.common.schedule import expires_text


def render_snapshot(instance: str, snap: dict[str, Any]) -> dict[str, Any]:
    body = public(snap)
    body["name"] = snap["name"]
    # Kept in the record for restore, but LXD 5.0's InstanceSnapshot has no description.
    body.pop("description", None)
    return body


async def snapshots_of(store: Any, project: str, name: str) -> list[dict[str, Any]]:
    prefix = records.record_prefix("instance-snapshots", project) + f"{name}/"
    return [render_snapshot(name, e.json()) for e in await store.list(prefix)]


async def all_snapshots(store: Any, project: str) -> dict[str, list[dict[str, Any]]]:
    """Every snapshot of the project's instances, by instance: one read for a listing."""
    prefix = records.record_prefix("instance-snapshots", project)
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in await store.list(prefix):
        instance = entry.key[len(prefix) :].partition("/")[0]
        found.setdefault(instance, []).append(render_snapshot(instance, entry.json()))
    return found


def snapshot_key(project: str, name: str, snapshot: str) -> str:
    return records.record_key("instance-snapshots", project, f"{name}/{snapshot}")


async def restore_snapshot(
    request: Request, project: str, record: InstanceRecord, restore: str
) -> Response:
    """The operation restoring instance `record` to its snapshot `restore`."""
    ctx = context(request)
    name = record.name
    # LXD takes "snap" or "<instance>/snap"; anything else names no snapshot of this one.
    full = restore if "/" in restore else f"{name}/{restore}"
    owner, _, snapshot = full.partition("/")
    missing = NotFound(f"Snapshot {full} does not exist")  # LXD: a failed operation
    if owner != name or not snapshot or "/" in snapshot:
        raise missing
    if await ctx.store.get(snapshot_key(project, name, snapshot)) is None:
        raise missing
    return await compute_operation(
        ctx,
        record,
        "Restoring snapshot",
        lambda compute, instance: compute.restore_snapshot(instance, snapshot, timeout=600),
    )


def default_expiry(config: dict[str, str]) -> str:
    """When a snapshot taken now expires by the `snapshots.expiry` of its instance's (or
    custom volume's) config ("": never; as LXD, an expiry it would refuse is none)."""
    try:
        return expires_text(datetime.now(UTC), config.get("snapshots.expiry", ""))
    except ValueError:
        return ""
