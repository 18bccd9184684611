"""The membership of a cluster's store: etcd's Cluster service, for the node agent (a
joining member's learner promoted to voter) and the api (a learner added for a joiner, a
removed member's voter dropped), and each etcd's own view of its role."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from croft.common.errors import Conflict, Unavailable
from croft.common.internal_tls import Identity
from croft.common.store.etcd import etcd_channel
from croft.etcdpb import rpc_pb2, rpc_pb2_grpc


@dataclass(frozen=True)
class StoreMember:
    """One etcd member of the cluster's store."""

    id: int
    name: str  # the croft member's name ("" for a learner that has not started yet)
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool


def _members(reply: rpc_pb2.MemberListResponse | rpc_pb2.MemberAddResponse) -> list[StoreMember]:
    return [
        StoreMember(m.ID, m.name, tuple(m.peerURLs), tuple(m.clientURLs), m.isLearner)
        for m in reply.members
    ]


async def _call(
    endpoints: Sequence[str],
    what: str,
    call: object,
    identity: Identity | None,
    timeout: float = 5.0,
) -> object:
    seen: list[str] = []  # every endpoint's answer: etcd's "unhealthy cluster" matters
    for endpoint in endpoints:
        async with etcd_channel(endpoint, identity) as channel:
            stub = rpc_pb2_grpc.ClusterStub(channel)
            try:
                return await call(stub, timeout)  # type: ignore[operator]
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    seen.append(f"{endpoint}: {exc.details() or exc.code()}")
                    continue
                raise Conflict(f"the store refused to {what}: {exc.details()}") from None
    raise Unavailable(f"the store could not {what}: none answered ({'; '.join(seen)})")


async def list_members(
    endpoints: Sequence[str], identity: Identity | None = None
) -> list[StoreMember]:
    reply = await _call(
        endpoints,
        "list its members",
        lambda stub, t: stub.MemberList(rpc_pb2.MemberListRequest(), timeout=t),
        identity,
    )
    assert isinstance(reply, rpc_pb2.MemberListResponse)
    return _members(reply)


# What etcd answers while a membership change would be unsafe *for now*: a voter that has
# not yet been connected to every other voter for five seconds (just after a promotion or
# a restart) calls the cluster unhealthy, and it takes one learner at a time.
_TRANSIENT = ("unhealthy cluster", "too many learner members")


async def _settled(
    endpoints: Sequence[str],
    what: str,
    call: object,
    identity: Identity | None,
    patience: float = 60.0,
) -> object:
    """`_call`, retried while etcd refuses the change only for now (_TRANSIENT)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return await _call(endpoints, what, call, identity)
        except (Conflict, Unavailable) as exc:
            if not any(t in str(exc) for t in _TRANSIENT) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(1.0)


async def add_learner(
    endpoints: Sequence[str], name: str, peer_url: str, identity: Identity | None = None
) -> str:
    """Add a learner for member `name` at `peer_url`; returns the `--initial-cluster` it
    starts with (every member's name=peer URL, its own included). Waits while etcd refuses
    for now (the member before still a learner, a voter just promoted)."""
    reply = await _settled(
        endpoints,
        f"add {name} as a learner",
        lambda stub, t: stub.MemberAdd(
            rpc_pb2.MemberAddRequest(peerURLs=[peer_url], isLearner=True), timeout=t
        ),
        identity,
    )
    assert isinstance(reply, rpc_pb2.MemberAddResponse)
    parts = []
    for member in _members(reply):
        member_name = member.name or (name if peer_url in member.peer_urls else "")
        for url in member.peer_urls:
            if member_name:
                parts.append(f"{member_name}={url}")
    return ",".join(parts)


async def promote_learner(
    endpoints: Sequence[str], name: str, identity: Identity | None = None
) -> bool:
    """Promote member `name`'s learner to voter. True when it is a voter (now or already,
    or it is no member of the store); False while etcd refuses (not caught up yet)."""
    try:
        members = await list_members(endpoints, identity)
    except Unavailable:
        return False
    mine = [m for m in members if m.name == name]
    if not mine:
        return False
    if not mine[0].learner:
        return True
    with contextlib.suppress(Conflict, Unavailable):
        await _call(
            endpoints,
            f"promote {name}",
            lambda stub, t: stub.MemberPromote(
                rpc_pb2.MemberPromoteRequest(ID=mine[0].id), timeout=t
            ),
            identity,
        )
        return True
    return False


async def remove_member(
    endpoints: Sequence[str], name: str, identity: Identity | None = None
) -> bool:
    """Remove member `name`'s etcd from the store; False when it has none."""
    found = [m.id for m in await list_members(endpoints, identity) if m.name == name]
    if not found:
        return False
    request = rpc_pb2.MemberRemoveRequest(ID=found[0])
    await _settled(
        endpoints,
        f"remove {name}",
        lambda stub, t: stub.MemberRemove(request, timeout=t),
        identity,
    )
    return True


async def remove_peer(
    endpoints: Sequence[str],
    peer_url: str,
    identity: Identity | None = None,
    *,
    learner_only: bool = False,
) -> bool:
    """Remove the etcd member at `peer_url` (a learner that never started has no name
    yet); False when there is none (or, with `learner_only`, it is a voter)."""
    found = [
        m
        for m in await list_members(endpoints, identity)
        if peer_url in m.peer_urls and (m.learner or not learner_only)
    ]
    if not found:
        return False
    request = rpc_pb2.MemberRemoveRequest(ID=found[0].id)
    await _settled(
        endpoints,
        f"remove the member at {peer_url}",
        lambda stub, t: stub.MemberRemove(request, timeout=t),
        identity,
    )
    return True


@dataclass(frozen=True)
class StoreRole:
    """What one etcd says of itself."""

    voter: bool
    leader: bool
    learner: bool


async def own_role(
    endpoint: str, timeout: float = 2.0, identity: Identity | None = None
) -> StoreRole | None:
    """The role of the etcd at `endpoint` (None when it does not answer)."""
    async with etcd_channel(endpoint, identity) as channel:
        try:
            status = await rpc_pb2_grpc.MaintenanceStub(channel).Status(
                rpc_pb2.StatusRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return None
    leader = status.leader == status.header.member_id
    return StoreRole(voter=not status.isLearner, leader=leader, learner=status.isLearner)
