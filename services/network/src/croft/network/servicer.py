"""The network service's gRPC surface: protobuf in, core calls, protobuf out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc

from croft.common.errors import InvalidArgument
from croft.common.instance_config import parse_bool
from croft.common.models import NetworkRecord
from croft.common.records import DEFAULT_PROJECT
from croft.network.core import InstanceNic, NetworkCore
from croft.v1 import common_pb2, network_pb2, network_pb2_grpc

# LXD's NIC keys for the filters a network enforces, and their short names.
_FILTER_KEYS = {
    "security.mac_filtering": "mac",
    "security.ipv4_filtering": "ipv4",
    "security.ipv6_filtering": "ipv6",
}


def _filters(config: Mapping[str, str]) -> tuple[str, ...]:
    found = []
    for key, short in _FILTER_KEYS.items():
        value = config.get(key, "")
        try:
            on = parse_bool(value) if value else False
        except ValueError as exc:
            raise InvalidArgument(f"Invalid value for device option {key!r}: {exc}") from None
        if on:
            found.append(short)
    return tuple(found)


def _nic(request: network_pb2.NicRequest) -> InstanceNic:
    return InstanceNic(
        host_name=request.host_name,
        filters=_filters(request.config),
        acls=request.config.get("security.acls", ""),
        acl_config={k: v for k, v in request.config.items() if k.startswith("security.acls")},
        network=request.network,
        project=request.project or DEFAULT_PROJECT,
        instance=request.instance,
        device=request.device,
        hwaddr=request.hwaddr,
        ipv4=request.ipv4 or None,
        ipv6=request.ipv6 or None,
    )


def _object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise InvalidArgument(f"Invalid JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("config", {}), dict):
        raise InvalidArgument("Expected a JSON object with a 'config' object")
    return value


def _record(record: NetworkRecord) -> common_pb2.Json:
    return common_pb2.Json(json=json.dumps(record.public()))


class NetworkServicer(network_pb2_grpc.NetworkServicer):
    def __init__(self, core: NetworkCore) -> None:
        self.core = core

    async def AttachInstance(
        self, request: network_pb2.NicRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> network_pb2.NicReply:
        attached = await self.core.attach_instance(_nic(request))
        return network_pb2.NicReply(
            ipv4=attached.ipv4 or "",
            nic_type=attached.nic_type,
            parent=attached.parent,
            mtu=attached.mtu or 0,
        )

    async def DetachInstance(
        self, request: network_pb2.NicRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.core.detach_instance(_nic(request))
        return common_pb2.Empty()

    async def NetworkState(
        self, request: network_pb2.NetworkRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return common_pb2.Json(json=json.dumps(await self.core.network_state(request.name)))

    async def Leases(
        self, request: network_pb2.NetworkRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return common_pb2.Json(json=json.dumps(await self.core.leases(request.name)))

    async def CreateNetwork(
        self, request: common_pb2.Json, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        body = _object(request.json)
        record = await self.core.create_network(
            str(body.get("name", "")),
            str(body.get("type") or ""),
            body.get("config") or {},
            str(body.get("description") or ""),
        )
        return _record(record)

    async def UpdateNetwork(
        self, request: network_pb2.NetworkPut, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        body = _object(request.json)
        description = body.get("description")
        record = await self.core.update_network(
            request.name,
            body.get("config") or {},
            None if description is None else str(description),
        )
        return _record(record)

    async def DeleteNetwork(
        self, request: network_pb2.NetworkRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.core.delete_network(request.name)
        return common_pb2.Empty()

    async def RenameNetwork(
        self, request: network_pb2.NetworkRename, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return _record(await self.core.rename_network(request.name, request.new_name))

    async def ApplySecurity(
        self, request: network_pb2.NetworkRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.core.apply_security(request.name)
        return common_pb2.Empty()
