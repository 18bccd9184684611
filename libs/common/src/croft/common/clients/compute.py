"""The typed client of the compute service of one member: instances, their state, files, exec, snapshots, logs."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

import grpc
from typing_extensions import Unpack

from croft.common.clients._base import CallOptions, RequestStream, TypedClient
from croft.v1 import common_pb2, compute_pb2, compute_pb2_grpc


class ComputeClient(TypedClient):
    """One method per RPC of `croft.v1.Compute`, named after it in snake_case."""

    service: ClassVar[str] = "compute"
    stub = compute_pb2_grpc.ComputeStub

    def create_instance(
        self, request: compute_pb2.CreateInstanceRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("CreateInstance", request, options)

    def update_instance(
        self, request: compute_pb2.UpdateInstanceRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("UpdateInstance", request, options)

    def delete_instance(
        self, request: common_pb2.InstanceRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteInstance", request, options)

    def rename_instance(
        self, request: compute_pb2.RenameInstanceRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("RenameInstance", request, options)

    def copy_instance(
        self, request: compute_pb2.CopyInstanceRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("CopyInstance", request, options)

    def move_instance(
        self, request: compute_pb2.MoveInstanceRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("MoveInstance", request, options)

    def change_state(
        self, request: compute_pb2.StateRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("ChangeState", request, options)

    def get_state(
        self, request: common_pb2.InstanceRef, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceStateReply]:
        return self._unary("GetState", request, options)

    def get_states(
        self, request: compute_pb2.InstanceStatesRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceStatesReply]:
        return self._unary("GetStates", request, options)

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

    def delete_file(
        self, request: compute_pb2.FileRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteFile", request, options)

    def create_snapshot(
        self, request: compute_pb2.SnapshotRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("CreateSnapshot", request, options)

    def delete_snapshot(
        self, request: compute_pb2.SnapshotRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteSnapshot", request, options)

    def rename_snapshot(
        self, request: compute_pb2.SnapshotRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("RenameSnapshot", request, options)

    def restore_snapshot(
        self, request: compute_pb2.SnapshotRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self._unary("RestoreSnapshot", request, options)

    def console_log(
        self, request: common_pb2.InstanceRef, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.LogReply]:
        return self._unary("ConsoleLog", request, options)

    def clear_console_log(
        self, request: common_pb2.InstanceRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("ClearConsoleLog", request, options)

    def logs(
        self, request: compute_pb2.LogRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[compute_pb2.LogReply]:
        return self._unary("Logs", request, options)

    def publish_instance(
        self, request: compute_pb2.PublishRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[compute_pb2.PublishRequest, compute_pb2.PublishChunk]:
        return self.rpc.stream("PublishInstance", request, timeout=timeout)
