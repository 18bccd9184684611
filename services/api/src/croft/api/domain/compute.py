"""The work on one instance that its member's compute service does: the client, the
instance reference, operations whose work is one compute call, and live state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import Response

from croft.api import responses
from croft.api.context import ApiContext
from croft.api.domain.instances import resources
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.clients import ComputeClient
from croft.common.errors import CroftError, Timeout, Unavailable
from croft.common.riders import to_wire
from croft.v1 import common_pb2, compute_pb2


class ComputeCall(Protocol):
    """A bound unary method of a `ComputeClient` (`client.change_state`...)."""

    def __call__(
        self, request: Any, *, idempotent: bool = ..., timeout: float | None = ...
    ) -> Awaitable[Any]: ...


async def compute_of(record: dict[str, Any]) -> ComputeClient:
    return await services().compute(record["_croft"]["member"])


def ref(project: str, name: str) -> common_pb2.InstanceRef:
    return common_pb2.InstanceRef(project=project, name=name)


async def compute_operation(
    ctx: ApiContext,
    method: ComputeCall,
    message: Any,
    description: str,
    project: str,
    name: str,
    *,
    timeout: float | None = None,
) -> Response:
    """The 202 of an operation on instance `name` whose work is one call to its compute
    service (not retried: the call changes things)."""

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await call_closing(op, method, message, timeout=timeout)
        return None

    return await _operation(ctx, run, description, project, name)


# What a state change leaves the instance as, for the changes that can be told done by
# looking (a restart cannot: the instance ran before it too).
_WANTED_STATUS = {"start": "Running", "stop": "Stopped", "freeze": "Frozen", "unfreeze": "Running"}
# How long a state change whose compute died waits for the restarted one.
_COMPUTE_RETURN_WAIT = 60.0


async def state_operation(
    ctx: ApiContext,
    record: dict[str, Any],
    change: compute_pb2.StateRequest,
    description: str,
    *,
    timeout: float,
) -> Response:
    """The 202 of a state change (`PUT .../state`). When compute dies with the change
    sent, its reply is lost, not necessarily its work: once the restarted compute
    answers, the instance's state says whether the change went in, and a change that did
    not is made then. What the client is told is what the instance is: `lxc launch`'s
    start, for one, does not fail because compute restarted under it."""
    project, name = change.instance.project, change.instance.name

    async def run(op: OperationContext) -> dict[str, Any] | None:
        client = await compute_of(record)
        try:
            await call_closing(op, client.change_state, change, timeout=timeout)
            return None
        except (Unavailable, Timeout):
            wanted = _WANTED_STATUS.get(change.action)
            # No compute registered at all (the call waited for one, and none came): the
            # change was never sent, so there is no lost reply to look for.
            if wanted is None or not client.instances():
                raise
            if await _status_once_back(record, _COMPUTE_RETURN_WAIT) == wanted:
                return None  # the change went in; only its reply was lost
        # Again, on the restarted compute: it reads the record itself.
        again = compute_pb2.StateRequest(
            instance=change.instance,
            action=change.action,
            force=change.force,
            timeout=change.timeout,
        )
        await call_closing(op, client.change_state, again, timeout=timeout)
        return None

    return await _operation(ctx, run, description, project, name)


async def _status_once_back(record: dict[str, Any], wait: float) -> str | None:
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


async def call_closing(
    op: OperationContext, method: ComputeCall, message: Any, *, timeout: float | None
) -> None:
    """Call compute with the writes that end `op` for it to commit with its change, when
    the method takes them: one transaction fewer, and the operation is done exactly when
    the change is recorded."""
    if "closing" in message.DESCRIPTOR.fields_by_name:
        message.closing.extend(to_wire(await op.closing_writes()))
    reply = await method(message, idempotent=False, timeout=timeout)
    op.closed = bool(getattr(reply, "closed", False))


async def state_of(record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        client = await compute_of(record)
        reply = await client.get_state(
            ref(record.get("project", "default"), record["name"]), timeout=10
        )
        state: dict[str, Any] = json.loads(reply.state)
        return state
    except CroftError:
        return None


async def states_of(found: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The states of listed instances: one call per compute member, not one per instance.
    None for an instance whose member does not answer (LXD shows it without state)."""
    by_member: dict[str, list[int]] = {}
    for index, record in enumerate(found):
        by_member.setdefault(record["_croft"]["member"], []).append(index)
    states: list[dict[str, Any] | None] = [None] * len(found)

    async def ask(member: str, indexes: list[int]) -> None:
        try:
            client = await services().compute(member)
            reply = await client.get_states(
                compute_pb2.InstanceStatesRequest(
                    instances=[
                        ref(found[i].get("project", "default"), found[i]["name"]) for i in indexes
                    ]
                ),
                timeout=30,
            )
        except CroftError:
            return
        for index, state in zip(indexes, reply.states, strict=True):
            states[index] = json.loads(state) if state else None

    await asyncio.gather(*(ask(member, indexes) for member, indexes in by_member.items()))
    return states
