"""The work on one instance that its member's compute service does: the client, the
instance reference, operations whose work is one compute call, and live state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from croft.api import responses
from croft.api.context import ApiContext
from croft.api.domain.instances import Listed, load, resources
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.clients import ComputeClient
from croft.common.errors import CroftError, Timeout, Unavailable
from croft.common.models import InstanceRecord
from croft.common.riders import Rider
from croft.v1 import common_pb2, compute_pb2


async def compute_of(record: InstanceRecord) -> ComputeClient:
    """The client of the compute service of the member `record` is on."""
    return await services().compute(record.croft.member)


def ref(project: str, name: str) -> common_pb2.InstanceRef:
    return common_pb2.InstanceRef(project=project, name=name)


async def compute_for(request: Request, name: str) -> tuple[ComputeClient, common_pb2.InstanceRef]:
    """Instance `name` of the request's project, found as `load` finds it: the client of
    its member's compute service and its reference, for a handler whose work is one call."""
    project, record, _ = await load(request, name)
    return await compute_of(record), ref(project, name)


async def compute_operation(
    ctx: ApiContext,
    record: InstanceRecord,
    description: str,
    work: Callable[[ComputeClient, common_pb2.InstanceRef], Awaitable[object]],
) -> Response:
    """The 202 of an operation on the instance of `record` whose work is one call to its
    compute service: `work(client, instance)`, made by the operation's task, calls a
    method of that service's client for the instance."""
    client = await compute_of(record)
    instance = ref(record.project, record.name)

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await work(client, instance)
        return None

    return await _operation(ctx, run, description, record.project, record.name)


@contextlib.asynccontextmanager
async def closing(op: OperationContext) -> AsyncIterator[Rider]:
    """The writes that end `op`, for the one compute call that does its work to commit
    with its change: one transaction fewer, and the operation is done exactly when the
    change is recorded. `op` is closed when compute says they went in."""
    rider = Rider(await op.closing_writes())
    yield rider
    op.closed = rider.written


# What a state change leaves the instance as, for the changes that can be told done by
# looking (a restart cannot: the instance ran before it too).
_WANTED_STATUS = {"start": "Running", "stop": "Stopped", "freeze": "Frozen", "unfreeze": "Running"}
# How long a state change whose compute died waits for the restarted one.
_COMPUTE_RETURN_WAIT = 60.0


async def state_operation(
    ctx: ApiContext,
    record: InstanceRecord,
    revision: int,
    action: str,
    description: str,
    *,
    force: bool,
    timeout: int,
) -> Response:
    """The 202 of a state change (`PUT .../state`) of `record`, just read at `revision`.
    When compute dies with the change sent, its reply is lost, not necessarily its work:
    once the restarted compute answers, the instance's state says whether the change went
    in, and a change that did not is made then. What the client is told is what the
    instance is: `lxc launch`'s start, for one, does not fail because compute restarted
    under it."""
    project, name = record.project, record.name
    instance = ref(project, name)
    deadline = (30 if timeout < 0 else timeout) + 60

    async def change(
        op: OperationContext, client: ComputeClient, known: tuple[InstanceRecord, int] | None
    ) -> None:
        async with closing(op) as rider:
            await client.change_state(
                instance,
                action,
                force=force,
                timeout=timeout,
                known=known,
                rider=rider,
                deadline=deadline,
            )

    async def run(op: OperationContext) -> dict[str, Any] | None:
        client = await compute_of(record)
        try:
            # What was just read: compute need not read it again.
            await change(op, client, (record, revision))
            return None
        except (Unavailable, Timeout):
            wanted = _WANTED_STATUS.get(action)
            # No compute registered at all (the call waited for one, and none came): the
            # change was never sent, so there is no lost reply to look for.
            if wanted is None or not client.instances():
                raise
            if await _status_once_back(record, _COMPUTE_RETURN_WAIT) == wanted:
                return None  # the change went in; only its reply was lost
        # Again, on the restarted compute: it reads the record itself.
        await change(op, client, None)
        return None

    return await _operation(ctx, run, description, project, name)


async def _status_once_back(record: InstanceRecord, wait: float) -> str | None:
    """The instance's status as its compute service sees it, once that service answers
    (None if it does not within `wait` seconds)."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        state = await state_of(record)
        if state is not None:
            return str(state.get("status"))
        if asyncio.get_running_loop().time() >= deadline:
            return None
        await asyncio.sleep(0.5)


async def _operation(
    ctx: ApiContext,
    run: Callable[[OperationContext], Awaitable[dict[str, Any] | None]],
    description: str,
    project: str,
    name: str,
) -> Response:
    operation = await ctx.operations.create(
        description, run=run, resources=resources(name, project), project=project
    )
    return responses.async_operation(operation)


async def state_of(record: InstanceRecord) -> dict[str, Any] | None:
    try:
        client = await compute_of(record)
        reply = await client.get_state(ref(record.project, record.name), timeout=10)
        state: dict[str, Any] = json.loads(reply.state)
        return state
    except CroftError:
        return None


# How long a listing waits for another member's states: a member that is frozen or cut
# off (not yet Offline) must not hold every `lxc list` of the cluster for long.
REMOTE_STATES_TIMEOUT = 5.0


async def states_of(
    found: list[Listed], *, here: str = "", online: set[str] | None = None
) -> list[dict[str, Any] | None]:
    """The states of listed instances: one call per compute member, not one per instance.
    None for an instance whose member does not answer (LXD shows it without state): one
    not in `online` is not asked, another member than `here` is waited for
    REMOTE_STATES_TIMEOUT seconds at most."""
    by_member: dict[str, list[int]] = {}
    for index, record in enumerate(found):
        by_member.setdefault(record.meta.member, []).append(index)
    states: list[dict[str, Any] | None] = [None] * len(found)

    async def ask(member: str, indexes: list[int]) -> None:
        if online is not None and member not in online:
            return  # Offline: its heartbeat stopped
        try:
            client = await services().compute(member)
            if not client.rpc.instances():
                return  # not running (a dead member of a cluster): no call to wait for
            reply = await client.get_states(
                compute_pb2.InstanceStatesRequest(
                    instances=[ref(found[i].project, found[i].name) for i in indexes]
                ),
                timeout=30 if not here or member == here else REMOTE_STATES_TIMEOUT,
            )
        except CroftError:
            return
        for index, state in zip(indexes, reply.states, strict=True):
            states[index] = json.loads(state) if state else None

    await asyncio.gather(*(ask(member, indexes) for member, indexes in by_member.items()))
    return states
