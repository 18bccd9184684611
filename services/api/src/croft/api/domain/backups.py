"""Instance backups (`lxc export`, `lxc import`), in LXD 5.0's tarball format.

The api owns the backup records (`instance-backups/<project>/<instance>/<backup>`) and
writes the two yaml documents LXD puts in a tarball: `backup/index.yaml` (what the
tarball holds, and since LXD 5.0 the whole backup config under `config:`) and
`backup.yaml` (the instance, its snapshots, pool, profiles and volume records). The
tarball itself is made, kept, streamed and deleted by the storage service of the
instance's member (`croft.storage.backups`).

An import goes the other way: the body is streamed to the storage service of the member
that gets the instance, which checks it whole and stages it; the api builds the record
from its backup.yaml and that member's compute creates the instance from the staged
tarball (`ComputeClient.import_instance`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
import yaml
from starlette.requests import Request
from starlette.responses import Response

from croft.api import records, responses
from croft.api.context import ApiContext
from croft.api.domain import projects
from croft.api.domain.compute import closing
from croft.api.domain.instances import expand, render, resources, validate_name
from croft.api.domain.placement import place
from croft.api.domain.snapshots import render_snapshot, snapshots_of
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.errors import Conflict, CroftError, InvalidArgument, NotFound, Unavailable
from croft.common.models import (
    BackupMeta,
    InstanceBackupRecord,
    InstanceRecord,
    SnapshotRecord,
    StoragePoolRecord,
    VolumeBackupRecord,
)
from croft.common.records import INSTANCE_BACKUPS, STORAGE_POOLS, public, record_prefix
from croft.common.rpc import from_rpc_error
from croft.common.store import dump
from croft.v1 import storage_pb2

ZERO_TIME = "0001-01-01T00:00:00Z"
_LXD_IDMAP_KEYS = ("volatile.idmap.current", "volatile.idmap.next", "volatile.last_state.idmap")
COMPRESSIONS = ("gzip", "bzip2", "xz", "lzma", "zstd", "none")
# A backup of a big root volume may take long.
BACKUP_TIMEOUT = 3600.0
CHUNK = 1 << 20
# How many times (a second apart) a failed import tries to drop its staged upload.
DISCARD_ATTEMPTS = 60


def volume_name(project: str, name: str) -> str:
    """The instance's volume name on its pool: LXD's `<project>_<name>` outside default."""
    return name if project == "default" else f"{project}_{name}"


def backup_key(project: str, instance: str, backup: str) -> str:
    return InstanceBackupRecord.store_key(project, instance, backup)


def _pool_key(pool: str) -> str:
    return records.record_key(STORAGE_POOLS, "default", pool)


def validate_backup_name(name: str) -> None:
    if "/" in name:
        raise InvalidArgument("Backup names may not contain slashes")
    if name in (".", "..") or not name.strip():
        raise InvalidArgument(f'Invalid backup name "{name}"')


def check_compression(algorithm: str) -> None:
    if algorithm and algorithm not in COMPRESSIONS:
        raise InvalidArgument(f'Invalid compression algorithm "{algorithm}"')


def new_backup_name(requested: str, existing: Collection[str], compression: str) -> str:
    """A new backup's name: the one asked for, else LXD's first free `backup<N>`; checked,
    with the compression asked for (InvalidArgument), and Conflict when it is taken."""
    name = requested
    if not name:
        n = 0
        while f"backup{n}" in existing:
            n += 1
        name = f"backup{n}"
    validate_backup_name(name)
    check_compression(compression)
    if name in existing:
        raise Conflict(f'Backup "{name}" already exists')
    return name


# An instance's or a custom volume's backup record (`volume_backups` shares these helpers).
B = TypeVar("B", InstanceBackupRecord, VolumeBackupRecord)


def _expired(backup: InstanceBackupRecord | VolumeBackupRecord, now: datetime) -> bool:
    if not backup.expires_at or backup.expires_at.startswith("0001-"):
        return False
    try:
        when = datetime.fromisoformat(backup.expires_at.replace("Z", "+00:00"))
    except ValueError:
        return False
    return when <= now


async def backups_of(store: Any, project: str, instance: str) -> list[InstanceBackupRecord]:
    """The instance's backups, the expired ones deleted on the way (as LXD's pruning)."""
    prefix = record_prefix(INSTANCE_BACKUPS, project) + f"{instance}/"
    return await pruned(
        store,
        prefix,
        InstanceBackupRecord,
        lambda backup: delete_backup(store, project, instance, backup),
    )


async def pruned(
    store: Any, prefix: str, model: type[B], delete: Callable[[B], Awaitable[None]]
) -> list[B]:
    """The backup records under `prefix`, those expired (and whole) deleted on the way by
    `delete`, as LXD prunes them when it lists."""
    found = []
    now = datetime.now(UTC)
    for entry in await store.list(prefix):
        backup = model.model_validate(entry.json())
        if _expired(backup, now) and backup.croft.state != "creating":
            with contextlib.suppress(CroftError):
                await delete(backup)
            continue
        found.append(backup)
    return found


async def backup_of(store: Any, project: str, instance: str, name: str) -> InstanceBackupRecord:
    for backup in await backups_of(store, project, instance):
        if backup.name == name:
            return backup
    raise NotFound("Load backup from database: Instance backup not found")


def render_backup(backup: InstanceBackupRecord | VolumeBackupRecord) -> dict[str, Any]:
    body = backup.public()
    body["expires_at"] = body.get("expires_at") or ZERO_TIME
    return body


def _storage_request(
    project: str, record: InstanceRecord, backup: InstanceBackupRecord
) -> storage_pb2.InstanceBackupRequest:
    return storage_pb2.InstanceBackupRequest(
        pool=backup.croft.pool or record.croft.pool,
        project=project,
        type=record.type,
        name=volume_name(project, record.name),
        backup=backup.name,
        instance=record.name,
    )


async def backup_documents(
    store: Any,
    project: str,
    record: InstanceRecord,
    snapshots: list[dict[str, Any]],
    *,
    optimized: bool,
    standalone: bool,
) -> tuple[str, str]:
    """The tarball's index.yaml and backup.yaml, as LXD 5.0.2 writes them."""
    pool_name = record.croft.pool
    found = await store.get_json(_pool_key(pool_name))
    pool: dict[str, Any] = {}
    if found is not None:
        pool = StoragePoolRecord.model_validate(found[0]).public()
    profiles = []
    for name in record.profiles:
        profile = await store.get_json(records.record_key("profiles", project, name))
        if profile is not None:
            profiles.append(public(profile[0]))
    container = render(record, standalone)
    volume = {
        "config": {}, "description": "", "name": volume_name(project, record.name),
        "type": record.type, "used_by": [], "location": "none" if standalone else record.location,
        "content_type": "filesystem", "project": project, "created_at": ZERO_TIME,
    }  # fmt: skip
    volume_snapshots = [
        {
            "description": "",
            "expires_at": snap.get("expires_at") or ZERO_TIME,
            "name": snap["name"],
            "config": {},
            "content_type": "filesystem",
            "created_at": snap.get("created_at") or ZERO_TIME,
        }  # fmt: skip
        for snap in snapshots
    ]
    config: dict[str, Any] = {"container": container}
    if snapshots:
        config["snapshots"] = snapshots
    config.update(pool=pool, profiles=profiles, volume=volume, volume_snapshots=volume_snapshots)
    index: dict[str, Any] = {
        "name": record.name,
        "backend": pool.get("driver", "dir"),
        "pool": pool_name,
    }
    if snapshots:
        index["snapshots"] = [snap["name"] for snap in snapshots]
    index.update(optimized=optimized, optimized_header=optimized, type=record.type, config=config)
    return _yaml(index), _yaml(config)


def _yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


async def create_backup(
    store: Any,
    project: str,
    record: InstanceRecord,
    backup: InstanceBackupRecord,
    compression: str,
    *,
    standalone: bool,
) -> None:
    """Make the backup: its record claims the name, the storage service of the
    instance's member writes the tarball; on failure neither is left."""
    key = backup_key(project, record.name, backup.name)
    # Assigned whole: a record's dump keeps only the fields that were set.
    backup.croft = BackupMeta(
        member=record.croft.member,
        pool=record.croft.pool,
        compression=compression or "gzip",
        state="creating",
    )

    async def write() -> bool:
        snapshots = [] if backup.instance_only else await snapshots_of(store, project, record.name)
        index, body = await backup_documents(
            store, project, record, snapshots, optimized=False, standalone=standalone
        )
        request = _storage_request(project, record, backup)
        request.snapshots.extend(snap["name"] for snap in snapshots)
        request.compression = backup.croft.compression
        request.index_yaml, request.backup_yaml = index, body
        client = await services().storage(record.croft.member)
        request.optimized = backup.optimized_storage
        reply = await client.create_instance_backup(
            request, idempotent=False, timeout=BACKUP_TIMEOUT
        )
        return reply.optimized

    await write_backup(store, key, backup, write)


async def write_backup(
    store: Any, key: str, backup: B, write: Callable[[], Awaitable[bool]]
) -> None:
    """Claim the name with `backup`'s record at `key` ("creating"; Conflict if taken),
    have storage write the tarball (`write`, which says whether it holds send streams, a
    btrfs pool's, or trees), then mark the record created; on failure it goes."""
    try:
        await store.create(key, dump(backup.dump()))
    except Conflict:
        raise Conflict(f'Backup "{backup.name}" already exists') from None
    try:
        backup.optimized_storage = await write()
        backup.croft.state = "created"
        await store.put(key, dump(backup.dump()))
    except BaseException:
        with contextlib.suppress(CroftError):
            await store.delete(key)
        raise


async def delete_backup(
    store: Any, project: str, instance: str, backup: InstanceBackupRecord
) -> None:
    client = await services().storage(backup.croft.member)
    request = storage_pb2.InstanceBackupRequest(
        project=project, backup=backup.name, instance=instance, pool=backup.croft.pool
    )
    with contextlib.suppress(NotFound):
        await client.delete_instance_backup(request)
    await store.delete(backup_key(project, instance, backup.name))


async def export_chunks(
    project: str, instance: str, backup: InstanceBackupRecord
) -> AsyncIterator[bytes]:
    """The tarball's bytes, from the storage service that keeps it; NotFound before the
    first byte if it is gone, InvalidArgument while it is being written."""
    if backup.croft.state == "creating":
        raise InvalidArgument(f'Backup "{backup.name}" is still being written')
    client = await services().storage(backup.croft.member)
    return await backup_chunks(
        client.read_instance_backup(
            storage_pb2.InstanceBackupRequest(
                project=project, backup=backup.name, instance=instance, pool=backup.croft.pool
            ),
            timeout=None,
        )
    )


async def backup_chunks(
    call: grpc.aio.UnaryStreamCall[Any, storage_pb2.BackupChunk],
) -> AsyncIterator[bytes]:
    """The bytes of a backup tarball that storage streams (an instance's or a custom
    volume's), the first chunk awaited now: NotFound before the first byte if it is gone."""
    replies = call.__aiter__()
    try:
        first = await anext(replies, None)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first.data
            async for chunk in replies:
                yield chunk.data
        finally:
            call.cancel()

    return body()


# ---------------------------------------------------------------------- import


async def stage_upload(request: Request, member: str, pool: str = "") -> storage_pb2.BackupReply:
    """Stream the request body to `member`'s storage service, which checks the tarball
    whole and stages it (InvalidArgument, nothing staged, for a bad one); a custom volume
    or container backup for `pool` is unpacked straight into a volume of that pool."""
    return await stage_stream(request.stream(), member, pool)


async def stage_stream(
    chunks: AsyncIterator[bytes], member: str, pool: str = ""
) -> storage_pb2.BackupReply:
    """`stage_upload` of a tarball from any byte stream (another member's backup, when an
    instance moves between members)."""
    client = await services().storage(member)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(8)

    async def messages() -> AsyncIterator[storage_pb2.BackupChunk]:
        first = True
        while (data := await queue.get()) is not None:
            yield storage_pb2.BackupChunk(data=data, pool=pool if first else "")
            first = False

    call = client.upload_backup(messages(), timeout=BACKUP_TIMEOUT)

    async def feed() -> None:
        buffer = bytearray()
        async for chunk in chunks:
            buffer += chunk
            if len(buffer) >= CHUNK:
                await queue.put(bytes(buffer))
                buffer.clear()
        if buffer:
            await queue.put(bytes(buffer))
        await queue.put(None)

    feeding = asyncio.ensure_future(feed())
    try:
        reply: storage_pb2.BackupReply = await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        if not feeding.done():
            feeding.cancel()
        with contextlib.suppress(BaseException):
            await feeding
    return reply


async def discard_upload(member: str, upload: str) -> None:
    """Drop a staged upload; a storage service that is restarting (the import failed
    because it died) is given a while to come back (DISCARD_ATTEMPTS)."""
    for _ in range(DISCARD_ATTEMPTS):
        try:
            client = await services().storage(member)
            await client.discard_backup_upload(storage_pb2.BackupUploadRef(upload=upload))
            return
        except Unavailable:
            await asyncio.sleep(1.0)
        except CroftError:
            return


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"Invalid backup: {what} is missing or not a mapping")
    return value


async def imported_record(
    store: Any, project: str, name: str, pool: str, staged: storage_pb2.BackupReply
) -> tuple[InstanceRecord, list[SnapshotRecord]]:
    """The new instance's record (and its snapshots') from the staged tarball's yaml,
    named `name` ("": the backup's own) on `pool` ("": the backup's own), as LXD's
    import makes it: config and devices as they were (volatile keys kept), profiles
    applied again here."""
    index = _mapping(yaml.safe_load(staged.index_yaml), "index.yaml")
    body = _mapping(yaml.safe_load(staged.backup_yaml), "backup.yaml")
    container = _mapping(body.get("container"), "backup.yaml's container")
    if index.get("type", "container") != "container":
        raise InvalidArgument("Only container backups can be imported yet")
    name = name or str(container.get("name") or index.get("name") or "")
    validate_name(name)
    pool = pool or str(index.get("pool") or "")
    if not pool or await store.get_json(_pool_key(pool)) is None:
        raise NotFound(f'Storage pool "{pool}" not found')
    config = {
        str(k): str(v)
        for k, v in _mapping(container.get("config") or {}, "config").items()
        # LXD's id-map bookkeeping: storage unshifted the trees, croft keeps them so.
        if k not in _LXD_IDMAP_KEYS
    }
    devices = {
        str(k): {str(dk): str(dv) for dk, dv in _mapping(v, "a device").items()}
        for k, v in _mapping(container.get("devices") or {}, "devices").items()
    }
    profiles = [str(p) for p in container.get("profiles") or []]
    expanded_config, expanded_devices = await expand(store, project, profiles, config, devices)
    root = next(
        (
            n
            for n, d in expanded_devices.items()
            if d.get("type") == "disk" and d.get("path") == "/"
        ),
        None,
    )
    if root is None:
        devices["root"] = {"type": "disk", "path": "/", "pool": pool}
    elif expanded_devices[root].get("pool") != pool:
        devices[root] = {**expanded_devices[root], "pool": pool}
    expanded_config, expanded_devices = await expand(store, project, profiles, config, devices)
    record = InstanceRecord.model_validate(
        {
            "name": name,
            "project": project,
            "type": "container",
            "architecture": container.get("architecture") or "x86_64",
            "config": config,
            "devices": devices,
            "profiles": profiles,
            "description": container.get("description") or "",
            "ephemeral": bool(container.get("ephemeral")),
            "stateful": bool(container.get("stateful")),
            "expanded_config": expanded_config,
            "expanded_devices": expanded_devices,
        }
    )
    in_tarball = [str(s) for s in index.get("snapshots") or []]
    listed = {str(s.get("name")): s for s in body.get("snapshots") or [] if isinstance(s, dict)}
    snapshots = []
    for snap_name in in_tarball:
        snap = listed.get(snap_name, {"name": snap_name})
        snapshots.append(
            SnapshotRecord.model_validate(
                {
                    "name": snap_name,
                    "architecture": snap.get("architecture") or record.architecture,
                    "config": {str(k): str(v) for k, v in (snap.get("config") or {}).items()},
                    "devices": snap.get("devices") or {},
                    "profiles": snap.get("profiles") or [],
                    "expanded_config": snap.get("expanded_config") or {},
                    "expanded_devices": snap.get("expanded_devices") or {},
                    "ephemeral": bool(snap.get("ephemeral")),
                    "stateful": bool(snap.get("stateful")),
                    "created_at": _time(snap.get("created_at")),
                    "last_used_at": _time(snap.get("last_used_at")),
                    "expires_at": _time(snap.get("expires_at")),
                }
            )
        )
    return record, snapshots


def _time(value: Any) -> str:
    """A yaml time (which PyYAML may have read as a datetime) as RFC 3339."""
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value) if value else ZERO_TIME


async def import_member(store: Any) -> str:
    return await place(store)


__all__ = [
    "BACKUP_TIMEOUT",
    "backup_chunks",
    "backup_of",
    "backups_of",
    "check_compression",
    "create_backup",
    "delete_backup",
    "discard_upload",
    "export_chunks",
    "import_operation",
    "imported_record",
    "import_member",
    "new_backup_name",
    "pruned",
    "render_backup",
    "write_backup",
    "render_snapshot",
    "stage_stream",
    "stage_upload",
    "validate_backup_name",
]


async def import_operation(ctx: ApiContext, request: Request, project: str) -> Response:
    """`lxc import`: POST /1.0/instances with the tarball as an octet-stream body, the
    name and pool in `X-LXD-name` / `X-LXD-pool`. The tarball is checked whole and staged
    before the answer (400, nothing made, for a bad one); the operation creates the
    instance from it. On any failure nothing is left, the staged upload included."""
    name = request.headers.get("X-LXD-name", "")
    pool = request.headers.get("X-LXD-pool", "")
    if name:
        validate_name(name)
    member = await place(ctx.store)
    # Named, the pool gets the container's tree straight into a volume of its own.
    staged = await stage_upload(request, member, pool)
    try:
        record, snapshots = await imported_record(ctx.store, project, name, pool, staged)
        if await ctx.store.get(InstanceRecord.store_key(project, record.name)) is not None:
            raise Conflict(f'Instance "{record.name}" already exists')
        await projects.check_instance(ctx.store, project, record, action="create")
    except BaseException:
        await discard_upload(member, staged.upload)
        raise
    instance_name = record.name

    async def run(op: OperationContext) -> dict[str, Any] | None:
        try:
            client = await services().compute(member)
            async with closing(op) as rider:
                await client.import_instance(
                    record, staged.upload, snapshots, rider=rider, timeout=BACKUP_TIMEOUT
                )
        except BaseException:
            await discard_upload(member, staged.upload)
            raise
        finally:
            await projects.release_instance(ctx.store, project, instance_name)
        return None

    operation = await ctx.operations.create(
        "Creating instance", run=run, resources=resources(record.name, project),
        project=project, done_if_created=InstanceRecord.store_key(project, record.name),
    )  # fmt: skip
    return responses.async_operation(operation)
