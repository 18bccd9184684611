"""The typed client of the network service of one member: NICs, networks' state and leases."""

from __future__ import annotations

from collections.abc import Awaitable

from typing_extensions import Unpack

from croft.common.clients._base import CallOptions, TypedClient
from croft.common.models import NetworkRecord
from croft.v1 import common_pb2, network_pb2, network_pb2_grpc


class NetworkClient(TypedClient, service="network", stub=network_pb2_grpc.NetworkStub):
    def attach_instance(
        self, request: network_pb2.NicRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[network_pb2.NicReply]:
        return self._unary("AttachInstance", request, options)

    def detach_instance(
        self, request: network_pb2.NicRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DetachInstance", request, options)

    def network_state(
        self, request: network_pb2.NetworkRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("NetworkState", request, options)

    def leases(
        self, request: network_pb2.NetworkRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("Leases", request, options)

    def create_network(
        self, request: common_pb2.Json, **options: Unpack[CallOptions]
    ) -> Awaitable[NetworkRecord]:
        return self._record("CreateNetwork", request, options, NetworkRecord)

    def update_network(
        self, request: network_pb2.NetworkPut, **options: Unpack[CallOptions]
    ) -> Awaitable[NetworkRecord]:
        return self._record("UpdateNetwork", request, options, NetworkRecord)

    def delete_network(
        self, request: network_pb2.NetworkRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteNetwork", request, options)

    def rename_network(
        self, request: network_pb2.NetworkRename, **options: Unpack[CallOptions]
    ) -> Awaitable[NetworkRecord]:
        return self._record("RenameNetwork", request, options, NetworkRecord)

    def apply_security(
        self, request: network_pb2.NetworkRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("ApplySecurity", request, options)
