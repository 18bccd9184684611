"""`lxc cluster evacuate/restore` (LXD 5.0's evacuateClusterMember/restoreClusterMember).

Evacuating a member marks it `evacuated` (status Evacuated, "Unavailable due to
maintenance"; placement skips it and refuses it as a target), then takes its instances
one by one by their `cluster.evacuate`:

- `auto`: a container on local storage cannot move, so (as LXD's `canMigrate` says of a
  local root disk) it is stopped where it is;
- `stop`: stopped where it is;
- `migrate`: moved (cold, `croft.api.domain.instance_move`) to the member placement picks
  (fewest instances), remembering `volatile.evacuate.origin`, and started there if it
  ran; with no member to take it, it is stopped where it is, as LXD does (and so is one
  with backups, which a move between members would not take along).

A running instance that stays is shut down cleanly within `boot.host_shutdown_timeout`
(30 s), forced after, and keeps `volatile.last_state.power=RUNNING`. Restoring marks the
member `created` again, starts the instances that were running, and moves back (and
starts again) the ones whose `volatile.evacuate.origin` is this member. A failed
evacuation puts the member back as it was.
"""

from __future__ import annotations

from typing import Any

from croft.api import records
from croft.api.context import ApiContext
from croft.api.domain import instance_move
from croft.api.domain.backups import backups_of
from croft.api.domain.compute import compute_of, ref
from croft.api.domain.instances import KIND
from croft.api.domain.placement import place
from croft.api.operations import OperationContext
from croft.common import cluster
from croft.common.cluster import MemberRecord
from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.models import InstanceRecord
from croft.common.revert import Reverter

POWER_KEY = "volatile.last_state.power"
ORIGIN_KEY = "volatile.evacuate.origin"
DEFAULT_SHUTDOWN_TIMEOUT = 30


async def _set_state(ctx: ApiContext, name: str, state: str) -> None:
    def change(current: dict[str, Any]) -> dict[str, Any]:
        record = MemberRecord.load(current)
        if record.state == state:
            if state == cluster.STATE_EVACUATED:
                raise InvalidArgument("Cluster member is already evacuated")
            raise InvalidArgument("Cluster member is already restored")
        record.state = state
        return record.dump()

    await records.modify(
        ctx.store, cluster.member_key(name), change, missing="Cluster member not found"
    )


async def instances_on(ctx: ApiContext, member: str) -> list[InstanceRecord]:
    found = []
    for entry in await ctx.store.list(records.RECORDS + f"{KIND}/"):
        raw = entry.json()
        if InstanceRecord.meta_of(raw).member == member:
            found.append(InstanceRecord.model_validate(raw))
    return sorted(found, key=lambda r: (r.project, r.name))


async def _progress(op: OperationContext, text: str) -> None:
    await op.update_metadata({"evacuation_progress": text})


async def _set_config(ctx: ApiContext, record: InstanceRecord, key: str, value: str) -> None:
    """Set (or, with "", drop) one of the instance's volatile keys in its record."""

    def change(current: dict[str, Any]) -> dict[str, Any]:
        for section in ("config", "expanded_config"):
            config = current.setdefault(section, {})
            if value:
                config[key] = value
            else:
                config.pop(key, None)
        return current

    await records.modify(ctx.store, record.key(), change, missing="Instance not found")


async def _reload(ctx: ApiContext, record: InstanceRecord) -> InstanceRecord:
    found = await ctx.store.get_json(record.key())
    if found is None:
        raise NotFound("Instance not found")
    return InstanceRecord.model_validate(found[0])


async def _set_power(ctx: ApiContext, record: InstanceRecord, power: str) -> None:
    await _set_config(ctx, record, POWER_KEY, power)


async def evacuate(ctx: ApiContext, op: OperationContext, name: str) -> None:
    await _set_state(ctx, name, cluster.STATE_EVACUATED)
    async with Reverter() as revert:
        revert.add(lambda: _set_state(ctx, name, cluster.STATE_CREATED))
        for record in await instances_on(ctx, name):
            if record.expanded_config.get("cluster.evacuate", "auto") == "migrate":
                try:
                    target = await place(ctx.store)
                except CroftError:
                    target = ""  # no member can take it: stopped where it is
                if await backups_of(ctx.store, record.project, record.name):
                    target = ""  # a move would not take its backups along
                if target:
                    await _progress(
                        op, f'Migrating "{record.name}" in project "{record.project}" '
                        f'to "{target}"',
                    )  # fmt: skip
                    await _set_config(ctx, record, ORIGIN_KEY, name)
                    record = await _reload(ctx, record)
                    await instance_move.move(ctx, record, target)
                    continue
            if record.status == "Stopped":
                continue
            await _progress(op, f'Stopping "{record.name}" in project "{record.project}"')
            client = await compute_of(record)
            instance = ref(record.project, record.name)
            try:
                timeout = int(record.expanded_config.get("boot.host_shutdown_timeout", ""))
            except ValueError:
                timeout = DEFAULT_SHUTDOWN_TIMEOUT
            try:
                await client.change_state(instance, "stop", timeout=timeout, deadline=timeout + 60)
            except CroftError:
                await client.change_state(instance, "stop", force=True, deadline=120)
            # So that restore starts it again.
            await _set_power(ctx, record, "RUNNING")
        revert.success()


async def restore(ctx: ApiContext, op: OperationContext, name: str) -> None:
    await _set_state(ctx, name, cluster.STATE_CREATED)
    async with Reverter() as revert:
        revert.add(lambda: _set_state(ctx, name, cluster.STATE_EVACUATED))
        for record in await instances_on(ctx, name):
            if record.config.get(POWER_KEY) != "RUNNING" or record.status != "Stopped":
                continue
            await _progress(op, f'Starting "{record.name}" in project "{record.project}"')
            client = await compute_of(record)
            await client.change_state(ref(record.project, record.name), "start", deadline=120)
        for record in await _evacuated_from(ctx, name):
            await _progress(
                op, f'Migrating "{record.name}" in project "{record.project}" '
                f'from "{record.croft.member}"',
            )  # fmt: skip
            await instance_move.move(ctx, record, name)
            await _set_config(ctx, record, ORIGIN_KEY, "")
        revert.success()


async def _evacuated_from(ctx: ApiContext, member: str) -> list[InstanceRecord]:
    found = []
    for entry in await ctx.store.list(records.RECORDS + f"{KIND}/"):
        raw = entry.json()
        if (raw.get("config") or {}).get(ORIGIN_KEY) == member:
            found.append(InstanceRecord.model_validate(raw))
    return sorted(found, key=lambda r: (r.project, r.name))
