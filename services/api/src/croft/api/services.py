"""How REST handlers reach the other croft services: discovery-balanced gRPC clients
from the api process's ServiceContext. `install()` is called once at process start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from croft.common.discovery import Instance
from croft.common.errors import Unavailable
from croft.common.rpc import ServiceClient
from croft.common.service import ServiceContext
from croft.v1 import compute_pb2_grpc, images_pb2_grpc, network_pb2_grpc, storage_pb2_grpc


@dataclass
class Services:
    context: ServiceContext

    async def compute(self, member: str) -> ServiceClient[Any]:
        return await self.context.client("compute", compute_pb2_grpc.ComputeStub, member)

    async def storage(self, member: str) -> ServiceClient[Any]:
        return await self.context.client("storage", storage_pb2_grpc.StorageStub, member)

    async def network(self, member: str) -> ServiceClient[Any]:
        return await self.context.client("network", network_pb2_grpc.NetworkStub, member)

    async def images(self) -> ServiceClient[Any]:
        return await self.context.client("images", images_pb2_grpc.ImagesStub)

    def live(self, service: str) -> list[Instance]:
        """Live instances of a service, as last seen by this process's registry watch."""
        client = self.context._clients.get((service, None))
        return client.instances() if client is not None else []

    async def watch(self, *names: str) -> None:
        """Start following these services' registrations (for `live`)."""
        stubs = {
            "compute": compute_pb2_grpc.ComputeStub,
            "storage": storage_pb2_grpc.StorageStub,
            "network": network_pb2_grpc.NetworkStub,
            "images": images_pb2_grpc.ImagesStub,
        }
        for name in names:
            await self.context.client(name, stubs[name])


_services: Services | None = None


def install(context: ServiceContext) -> Services:
    global _services
    _services = Services(context)
    return _services


def services() -> Services:
    if _services is None:
        raise Unavailable("the api is not connected to the other services")
    return _services
