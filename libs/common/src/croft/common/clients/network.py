"""The typed client of the network service of one member: NICs, networks' state and leases."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

from croft.common.clients._base import TypedClient
from croft.v1 import common_pb2, network_pb2, network_pb2_grpc


class NetworkClient(TypedClient):
    """One method per RPC of `croft.v1.Network`, named after it in snake_case."""

    service: ClassVar[str] = "network"
    stub = network_pb2_grpc.NetworkStub

    def attach_instance(
        self,
        request: network_pb2.NicRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[network_pb2.NicReply]:
        return self.rpc.call("AttachInstance", request, idempotent=idempotent, timeout=timeout)

    def detach_instance(
        self,
        request: network_pb2.NicRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DetachInstance", request, idempotent=idempotent, timeout=timeout)

    def network_state(
        self,
        request: network_pb2.NetworkRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("NetworkState", request, idempotent=idempotent, timeout=timeout)

    def leases(
        self,
        request: network_pb2.NetworkRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("Leases", request, idempotent=idempotent, timeout=timeout)

    def create_network(
        self, request: common_pb2.Json, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("CreateNetwork", request, idempotent=idempotent, timeout=timeout)

    def update_network(
        self,
        request: network_pb2.NetworkPut,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("UpdateNetwork", request, idempotent=idempotent, timeout=timeout)

    def delete_network(
        self,
        request: network_pb2.NetworkRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteNetwork", request, idempotent=idempotent, timeout=timeout)
