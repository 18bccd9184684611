"""`lxc move c1 --target m3`: a container moves between members (LXD 5.0's
migrateInstance for local storage: a running one is stopped, copied, deleted at the source
and started again at the target).

croft has no member-to-member volume stream yet, so the move rides on the backup path
(`lxc export` / `lxc import`): a tarball of the instance (with its snapshots) is made by
the source member's storage, staged on the target's storage and, as the way back, once
more on the source's; the source instance is deleted and the target's compute creates it
from its staged copy. If that fails, the source's compute creates it again from the
other copy: the instance is never lost. Staged copies left unused are discarded.
"""

from __future__ import annotations

import secrets
from typing import Any

from croft.api.context import ApiContext
from croft.api.domain import backups, cluster
from croft.api.domain.compute import compute_of, ref
from croft.api.services import services
from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.models import InstanceBackupRecord, InstanceRecord

STOP_TIMEOUT = 30


async def check_target(ctx: ApiContext, record: InstanceRecord, target: str) -> None:
    """LXD's refusals before a move to `target`; nothing changes."""
    views = {v.record.name: v for v in await cluster.views(ctx.store)}
    if target not in views:
        raise NotFound("Failed to get target node: Cluster member not found")
    if not views[target].online:
        raise InvalidArgument("Target node is offline")
    if await backups.backups_of(ctx.store, record.project, record.name):
        raise InvalidArgument("Instance has backups")


async def move(ctx: ApiContext, record: InstanceRecord, target: str) -> None:
    project, name = record.project, record.name
    source = record.croft.member
    instance = ref(project, name)
    source_compute = await compute_of(record)
    running = record.status != "Stopped"
    if running:
        await source_compute.change_state(instance, "stop", timeout=STOP_TIMEOUT, deadline=120)
    backup = InstanceBackupRecord(name=f"croft-move-{secrets.token_hex(4)}")
    await backups.create_backup(ctx.store, project, record, backup, "none", standalone=False)
    staged: dict[str, Any] = {}
    try:
        for member in (target, source):
            chunks = await backups.export_chunks(project, name, backup)
            staged[member] = await backups.stage_stream(chunks, member)
    except BaseException:
        for member, reply in staged.items():
            await backups.discard_upload(member, reply.upload)
        raise
    finally:
        await backups.delete_backup(ctx.store, project, name, backup)
    used = ""
    try:
        moved, snapshots = await backups.imported_record(
            ctx.store, project, name, record.croft.pool, staged[target]
        )
        await source_compute.delete_instance(instance, idempotent=False, timeout=600)
        try:
            target_compute = await services().compute(target)
            await target_compute.import_instance(
                moved, staged[target].upload, snapshots, timeout=backups.BACKUP_TIMEOUT
            )
            used = target
        except BaseException:
            back, snapshots = await backups.imported_record(
                ctx.store, project, name, record.croft.pool, staged[source]
            )
            await source_compute.import_instance(
                back, staged[source].upload, snapshots, timeout=backups.BACKUP_TIMEOUT
            )
            used = source
            raise
    finally:
        for member, reply in staged.items():
            if member != used:
                await backups.discard_upload(member, reply.upload)
    if running:
        target_compute = await services().compute(target)
        try:
            await target_compute.change_state(instance, "start", deadline=120)
        except CroftError as exc:
            raise CroftError(f'Failed starting instance "{name}": {exc}') from exc
