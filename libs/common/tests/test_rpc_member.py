"""Every call to a per-host service names its member, and a per-host service refuses a
call meant for another member: real gRPC servers and clients, real discovery in etcd."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import pytest

from croft.common import discovery, rpc
from croft.common.errors import PreconditionFailed
from croft.common.store.etcd import EtcdStore
from croft.v1 import common_pb2, common_pb2_grpc

HANG_GUARD = 30  # only keeps a broken test from hanging


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG_GUARD):
        while not condition():  # noqa: ASYNC110 (polling a client's view of discovery)
            await asyncio.sleep(0.02)


@pytest.fixture
async def served(store: EtcdStore) -> AsyncIterator[Callable[..., object]]:
    """Start a real server of `service` for member `member`, registered in discovery
    under `registered_as` (another member's name: a registration that points a caller at
    the wrong member)."""
    cleanup: list[Callable[[], object]] = []

    async def serve(service: str, member: str, registered_as: str) -> None:
        server = rpc.Server(service, member, secrets.token_hex(3))
        address = await server.start()
        registration = await discovery.register(
            store, service, registered_as, address, ttl=5, instance_id=server.instance_id
        )
        cleanup.append(registration.deregister)
        cleanup.append(lambda: server.stop(grace=0))

    yield serve
    for step in reversed(cleanup):
        await step()  # type: ignore[misc]


async def status_from(store: EtcdStore, service: str, member: str) -> common_pb2.StatusReply:
    client = rpc.ServiceClient(store, service, common_pb2_grpc.ServiceStub, member=member)
    try:
        await client.start()
        await until(lambda: bool(client.instances()))
        reply: common_pb2.StatusReply = await client.call("Status", common_pb2.StatusRequest())
        return reply
    finally:
        await client.close()


@pytest.mark.parametrize("service", sorted(rpc.PER_HOST_SERVICES))
async def test_a_per_host_service_answers_calls_for_its_own_member(
    store: EtcdStore, served: Callable[..., object], service: str
) -> None:
    member = f"m-{secrets.token_hex(3)}"
    await served(service, member, member)  # type: ignore[misc]
    assert (await status_from(store, service, member)).member == member


@pytest.mark.parametrize("service", sorted(rpc.PER_HOST_SERVICES))
async def test_a_per_host_service_refuses_a_call_meant_for_another_member(
    store: EtcdStore, served: Callable[..., object], service: str
) -> None:
    mine, other = f"m-{secrets.token_hex(3)}", f"m-{secrets.token_hex(3)}"
    await served(service, mine, other)  # type: ignore[misc]
    with pytest.raises(PreconditionFailed, match=f"serves member '{mine}', not '{other}'"):
        await status_from(store, service, other)


async def test_a_control_plane_service_serves_any_caller(
    store: EtcdStore, served: Callable[..., object]
) -> None:
    # Control-plane services keep no per-member state: a member name means nothing there.
    mine, other = f"m-{secrets.token_hex(3)}", f"m-{secrets.token_hex(3)}"
    await served("images", mine, other)  # type: ignore[misc]
    assert (await status_from(store, "images", other)).member == mine
