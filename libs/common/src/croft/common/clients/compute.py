"""The typed client of the compute service of one member: instances, their state, files, exec, snapshots, logs."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

import grpc

from croft.common.clients._base import RequestStream, TypedClient
from croft.v1 import common_pb2, compute_pb2, compute_pb2_grpc


class ComputeClient(TypedClient):
    """One method per RPC of `croft.v1.Compute`, named after it in snake_case."""

    service: ClassVar[str] = "compute"
    stub = compute_pb2_grpc.ComputeStub

    def create_instance(
        self,
        request: compute_pb2.CreateInstanceRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("CreateInstance", request, idempotent=idempotent, timeout=timeout)

    def update_instance(
        self,
        request: compute_pb2.UpdateInstanceRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("UpdateInstance", request, idempotent=idempotent, timeout=timeout)

    def delete_instance(
        self,
        request: common_pb2.InstanceRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteInstance", request, idempotent=idempotent, timeout=timeout)

    def rename_instance(
        self,
        request: compute_pb2.RenameInstanceRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("RenameInstance", request, idempotent=idempotent, timeout=timeout)

    def change_state(
        self,
        request: compute_pb2.StateRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("ChangeState", request, idempotent=idempotent, timeout=timeout)

    def get_state(
        self,
        request: common_pb2.InstanceRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceStateReply]:
        return self.rpc.call("GetState", request, idempotent=idempotent, timeout=timeout)

    def get_states(
        self,
        request: compute_pb2.InstanceStatesRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceStatesReply]:
        return self.rpc.call("GetStates", request, idempotent=idempotent, timeout=timeout)

    def exec(
        self, requests: RequestStream[compute_pb2.ExecInput], *, timeout: float | None = None
    ) -> grpc.aio.StreamStreamCall[compute_pb2.ExecInput, compute_pb2.ExecOutput]:
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
        self, request: compute_pb2.FileRef, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteFile", request, idempotent=idempotent, timeout=timeout)

    def create_snapshot(
        self,
        request: compute_pb2.SnapshotRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("CreateSnapshot", request, idempotent=idempotent, timeout=timeout)

    def delete_snapshot(
        self,
        request: compute_pb2.SnapshotRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteSnapshot", request, idempotent=idempotent, timeout=timeout)

    def rename_snapshot(
        self,
        request: compute_pb2.SnapshotRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("RenameSnapshot", request, idempotent=idempotent, timeout=timeout)

    def restore_snapshot(
        self,
        request: compute_pb2.SnapshotRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.InstanceReply]:
        return self.rpc.call("RestoreSnapshot", request, idempotent=idempotent, timeout=timeout)

    def console_log(
        self,
        request: common_pb2.InstanceRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.LogReply]:
        return self.rpc.call("ConsoleLog", request, idempotent=idempotent, timeout=timeout)

    def clear_console_log(
        self,
        request: common_pb2.InstanceRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("ClearConsoleLog", request, idempotent=idempotent, timeout=timeout)

    def logs(
        self,
        request: compute_pb2.LogRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[compute_pb2.LogReply]:
        return self.rpc.call("Logs", request, idempotent=idempotent, timeout=timeout)

    def publish_instance(
        self, request: compute_pb2.PublishRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[compute_pb2.PublishRequest, compute_pb2.PublishChunk]:
        return self.rpc.stream("PublishInstance", request, timeout=timeout)
