"""How REST handlers reach the other croft services: discovery-balanced gRPC clients
from the api process's ServiceContext. `install()` is called once at process start."""

from __future__ import annotations

from dataclasses import dataclass

from croft.common.clients import (
    AuthClient,
    ComputeClient,
    ImagesClient,
    NetworkClient,
    StorageClient,
)
from croft.common.discovery import Instance
from croft.common.errors import Unavailable
from croft.common.service import ServiceContext


@dataclass
class Services:
    context: ServiceContext

    async def compute(self, member: str) -> ComputeClient:
        return ComputeClient(
            await self.context.client(ComputeClient.service, ComputeClient.stub, member)
        )

    async def storage(self, member: str) -> StorageClient:
        return StorageClient(
            await self.context.client(StorageClient.service, StorageClient.stub, member)
        )

    async def network(self, member: str) -> NetworkClient:
        return NetworkClient(
            await self.context.client(NetworkClient.service, NetworkClient.stub, member)
        )

    async def images(self) -> ImagesClient:
        return ImagesClient(await self.context.client(ImagesClient.service, ImagesClient.stub))

    async def auth(self) -> AuthClient:
        return AuthClient(await self.context.client(AuthClient.service, AuthClient.stub))

    def live(self, service: str) -> list[Instance]:
        """Live instances of a service, as last seen by this process's registry watch."""
        client = self.context._clients.get((service, None))
        return client.instances() if client is not None else []

    async def watch(self, *names: str) -> None:
        """Start following these services' registrations (for `live`)."""
        stubs = {
            c.service: c.stub for c in (ComputeClient, StorageClient, NetworkClient, ImagesClient)
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
