"""Instance snapshot schedules on this member, as LXD runs them: at each minute that an
instance's `snapshots.schedule` names, a snapshot (named by `snapshots.pattern`, expiring
after `snapshots.expiry`) of the instance if it runs, or also when stopped with
`snapshots.schedule.stopped`; and the snapshots whose `expires_at` has passed are deleted.
A minute passed while compute was down is not made up for, as in LXD."""

from __future__ import annotations

import logging
from datetime import datetime

from croft.common.errors import CroftError
from croft.common.instance_config import parse_bool
from croft.common.models import InstanceRecord, SnapshotRecord
from croft.common.records import RECORDS
from croft.common.schedule import CronSchedule, expired, expires_text, follow, snapshot_name
from croft.compute.core import ComputeCore

log = logging.getLogger(__name__)


async def follow_snapshot_schedules(core: ComputeCore) -> None:
    """Runs for the life of the service."""
    await follow(
        lambda minute: take_scheduled_snapshots(core, minute),
        lambda now: expire_snapshots(core, now),
        "instance",
    )


async def take_scheduled_snapshots(core: ComputeCore, minute: datetime) -> list[str]:
    """Snapshot this member's instances whose schedule names `minute`."""
    made = []
    for entry in await core.store.list(f"{RECORDS}instances/"):
        raw = entry.json()
        # Only `_croft` is read of every instance, the whole record of a scheduled one.
        schedule = (raw.get("expanded_config") or {}).get("snapshots.schedule", "")
        if not schedule or InstanceRecord.meta_of(raw).member != core.member:
            continue
        record = InstanceRecord.model_validate(raw)
        config, project, name = record.expanded_config, record.project, record.name
        try:
            if not CronSchedule.parse(schedule).matches(minute):
                continue
            stopped_too = parse_bool(config.get("snapshots.schedule.stopped") or "false")
            if record.status != "Running" and not stopped_too:
                continue
            prefix = SnapshotRecord.store_key(project, name, "")
            taken = {e.key[len(prefix) :] for e in await core.store.list(prefix)}
            snapshot = snapshot_name(config.get("snapshots.pattern", ""), taken)
            when = expires_text(minute, config.get("snapshots.expiry", ""))
            await core.create_snapshot(project, name, snapshot, when)
            made.append(f"{name}/{snapshot}")
            log.info("took scheduled snapshot %s/%s", name, snapshot)
        except (CroftError, ValueError) as exc:
            log.warning("scheduled snapshot of instance %s failed: %s", name, exc)
    return made


async def expire_snapshots(core: ComputeCore, now: datetime) -> list[str]:
    """Delete this member's instance snapshots whose `expires_at` has passed."""
    gone = []
    prefix = f"{RECORDS}instance-snapshots/"
    for entry in await core.store.list(prefix):
        snap = SnapshotRecord.model_validate(entry.json())
        if snap.croft.member != core.member or not expired(snap.expires_at, now):
            continue
        project, _, rest = entry.key[len(prefix) :].partition("/")
        name, _, snapshot = rest.partition("/")
        try:
            await core.delete_snapshot(project, name, snapshot)
            gone.append(f"{name}/{snapshot}")
            log.info("deleted expired snapshot %s/%s", name, snapshot)
        except CroftError as exc:
            log.warning("expired snapshot %s/%s not deleted: %s", name, snapshot, exc)
    return gone


__all__ = ["expire_snapshots", "follow_snapshot_schedules", "take_scheduled_snapshots"]
