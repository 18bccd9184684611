"""The typed client of the compute service of one member: instances, their state, files, exec, snapshots, logs."""

from __future__ import annotations

from typing import ClassVar

import grpc

from croft.common.clients._base import CallOptions, RequestStream, TypedClient, unary
from croft.common.models import InstanceRecord, SnapshotRecord
from croft.common.models.instance_wire import (
    instance_from_wire,
    instance_to_wire,
    snapshot_from_wire,
    snapshot_to_wire,
)
from croft.common.riders import Rider, to_wire
from croft.v1 import common_pb2, compute_pb2, compute_pb2_grpc


class ComputeClient(TypedClient):
    """One method per RPC of `croft.v1.Compute`, named after it in snake_case. The calls
    that carry instance or snapshot records take and return `croft.common.models`; the
    calls that change an instance are never sent twice (their `timeout` is the call's
    deadline, except for `change_state`, where it is LXD's)."""

    service: ClassVar[str] = "compute"
    stub = compute_pb2_grpc.ComputeStub

    async def create_instance(
        self,
        record: InstanceRecord,
        *,
        image_fingerprint: str = "",
        start: bool = False,
        rider: Rider | None = None,
        timeout: float | None = None,
    ) -> InstanceRecord:
        """Create `record` (expanded by the caller) from the image `image_fingerprint` (""
        for an empty instance), started with `start`; the record compute wrote. Never sent
        twice. `rider.written` says whether its writes went in with the create's last."""
        request = compute_pb2.CreateInstanceRequest(
            instance=instance_to_wire(record),
            image_fingerprint=image_fingerprint,
            start=start,
            closing=to_wire(rider.writes) if rider else (),
        )
        reply = await self._unary("CreateInstance", request, _changing(timeout))
        return _written(reply, rider)

    async def update_instance(
        self, record: InstanceRecord, *, revision: int = 0, timeout: float | None = None
    ) -> InstanceRecord:
        """Apply `record`'s config, devices, profiles and description (expanded again by the
        caller), based on the stored record at `revision` (0: any; Conflict when it moved
        on); the record compute wrote."""
        request = compute_pb2.UpdateInstanceRequest(
            instance=instance_to_wire(record), revision=revision
        )
        return _written(await self._unary("UpdateInstance", request, _changing(timeout)))

    delete_instance = unary("DeleteInstance", common_pb2.InstanceRef, common_pb2.Empty)

    async def rename_instance(
        self, ref: common_pb2.InstanceRef, new_name: str, *, timeout: float | None = None
    ) -> InstanceRecord:
        """Rename the stopped instance `ref` to `new_name`; the record under its new name."""
        request = compute_pb2.RenameInstanceRequest(instance=ref, new_name=new_name)
        return _written(await self._unary("RenameInstance", request, _changing(timeout)))

    async def import_instance(
        self,
        record: InstanceRecord,
        upload: str,
        snapshots: list[SnapshotRecord],
        *,
        rider: Rider | None = None,
        timeout: float | None = None,
    ) -> InstanceRecord:
        """Create `record` (expanded by the caller) from the backup tarball that storage
        staged as `upload`, with `snapshots` (oldest first, as backup.yaml lists them); the
        record compute wrote. Never sent twice."""
        request = compute_pb2.ImportInstanceRequest(
            instance=instance_to_wire(record),
            upload=upload,
            snapshots=[snapshot_to_wire(snap) for snap in snapshots],
            closing=to_wire(rider.writes) if rider else (),
        )
        reply = await self._unary("ImportInstance", request, _changing(timeout))
        return _written(reply, rider)

    async def copy_instance(
        self,
        record: InstanceRecord,
        source: common_pb2.InstanceRef,
        *,
        source_snapshot: str = "",
        instance_only: bool = False,
        allow_inconsistent: bool = False,
        rider: Rider | None = None,
        timeout: float | None = None,
    ) -> InstanceRecord:
        """Create `record` (expanded by the caller, its config merged with the source's)
        as a copy of instance `source` of the same member, or of its snapshot
        `source_snapshot`, with the source's snapshots unless `instance_only`; the record
        compute wrote. Never sent twice. `rider.written` as in `create_instance`."""
        request = compute_pb2.CopyInstanceRequest(
            instance=instance_to_wire(record),
            source=source,
            source_snapshot=source_snapshot,
            instance_only=instance_only,
            allow_inconsistent=allow_inconsistent,
            closing=to_wire(rider.writes) if rider else (),
        )
        reply = await self._unary("CopyInstance", request, _changing(timeout))
        return _written(reply, rider)

    async def move_instance(
        self,
        ref: common_pb2.InstanceRef,
        pool: str,
        *,
        instance_only: bool = False,
        live: bool = False,
        timeout: float | None = None,
    ) -> InstanceRecord:
        """Move the instance `ref`'s root volume (and its snapshots, deleted instead
        with `instance_only`) to storage pool `pool` of its member; the record after the
        move. A running instance moves only `live`, where its driver can (a VM's disk is
        mirrored). Never sent twice."""
        request = compute_pb2.MoveInstanceRequest(
            instance=ref, pool=pool, instance_only=instance_only, live=live
        )
        return _written(await self._unary("MoveInstance", request, _changing(timeout)))

    async def change_state(
        self,
        ref: common_pb2.InstanceRef,
        action: str,
        *,
        force: bool = False,
        timeout: int = -1,
        known: tuple[InstanceRecord, int] | None = None,
        rider: Rider | None = None,
        deadline: float | None = None,
    ) -> InstanceRecord:
        """start, stop, restart, freeze or unfreeze instance `ref` (`force` and `timeout`, in
        seconds, -1 for none, are LXD's); the record with its new status. `known` is the
        record and revision the caller just read, which saves compute a read; `deadline`
        bounds the call. Never sent twice. `rider.written` as in `create_instance`."""
        request = compute_pb2.StateRequest(
            instance=ref,
            action=action,
            force=force,
            timeout=timeout,
            closing=to_wire(rider.writes) if rider else (),
        )
        if known is not None:
            request.known.CopyFrom(instance_to_wire(known[0]))
            request.revision = known[1]
        reply = await self._unary("ChangeState", request, _changing(deadline))
        return _written(reply, rider)

    get_state = unary("GetState", common_pb2.InstanceRef, compute_pb2.InstanceStateReply)
    get_states = unary(
        "GetStates", compute_pb2.InstanceStatesRequest, compute_pb2.InstanceStatesReply
    )

    def exec(
        self,
        requests: RequestStream[compute_pb2.ExecInput] | None,
        *,
        timeout: float | None = None,
    ) -> grpc.aio.StreamStreamCall[compute_pb2.ExecInput, compute_pb2.ExecOutput]:
        """With `requests` None, the caller writes them: `call.write()`, `done_writing()`."""
        return self.rpc.stream("Exec", requests, timeout=timeout)

    def pull_file(
        self, request: compute_pb2.FileRef, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[compute_pb2.FileRef, compute_pb2.FileChunk]:
        return self.rpc.stream("PullFile", request, timeout=timeout)

    def push_file(
        self, requests: RequestStream[compute_pb2.FileChunk], *, timeout: float | None = None
    ) -> grpc.aio.StreamUnaryCall[compute_pb2.FileChunk, common_pb2.Empty]:
        return self.rpc.stream("PushFile", requests, timeout=timeout)

    delete_file = unary("DeleteFile", compute_pb2.FileRef, common_pb2.Empty)

    async def create_snapshot(
        self,
        ref: common_pb2.InstanceRef,
        snapshot: str,
        *,
        expires_at: str = "",
        timeout: float | None = None,
    ) -> SnapshotRecord:
        request = compute_pb2.SnapshotRequest(
            instance=ref, snapshot=snapshot, expires_at=expires_at
        )
        reply = await self._unary("CreateSnapshot", request, _changing(timeout))
        return snapshot_from_wire(reply.snapshot)

    async def delete_snapshot(
        self, ref: common_pb2.InstanceRef, snapshot: str, *, timeout: float | None = None
    ) -> None:
        request = compute_pb2.SnapshotRequest(instance=ref, snapshot=snapshot)
        await self._unary("DeleteSnapshot", request, _changing(timeout))

    async def rename_snapshot(
        self,
        ref: common_pb2.InstanceRef,
        snapshot: str,
        new_name: str,
        *,
        timeout: float | None = None,
    ) -> SnapshotRecord:
        request = compute_pb2.SnapshotRequest(instance=ref, snapshot=snapshot, new_name=new_name)
        reply = await self._unary("RenameSnapshot", request, _changing(timeout))
        return snapshot_from_wire(reply.snapshot)

    async def restore_snapshot(
        self, ref: common_pb2.InstanceRef, snapshot: str, *, timeout: float | None = None
    ) -> InstanceRecord:
        """Restore instance `ref` to its snapshot `snapshot`; the restored record."""
        request = compute_pb2.SnapshotRequest(instance=ref, snapshot=snapshot)
        return _written(await self._unary("RestoreSnapshot", request, _changing(timeout)))

    console_log = unary("ConsoleLog", common_pb2.InstanceRef, compute_pb2.LogReply)
    clear_console_log = unary("ClearConsoleLog", common_pb2.InstanceRef, common_pb2.Empty)
    logs = unary("Logs", compute_pb2.LogRequest, compute_pb2.LogReply)

    def publish_instance(
        self, request: compute_pb2.PublishRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[compute_pb2.PublishRequest, compute_pb2.PublishChunk]:
        return self.rpc.stream("PublishInstance", request, timeout=timeout)


def _changing(timeout: float | None) -> CallOptions:
    """The options of a call that changes an instance: not sent again to be safe."""
    return {"idempotent": False, "timeout": timeout}


def _written(reply: compute_pb2.InstanceReply, rider: Rider | None = None) -> InstanceRecord:
    """The record of `reply`; `rider.written` set from it."""
    if rider is not None:
        rider.written = reply.closed
    return instance_from_wire(reply.instance)
