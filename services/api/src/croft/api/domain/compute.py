"""The work on one instance that its member's compute service does: the client, the
instance reference, operations whose work is one compute call, and live state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, Protocol

from starlette.responses import Response

from croft.api import responses
from croft.api.context import ApiContext
from croft.api.domain.instances import resources
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.clients import ComputeClient
from croft.common.errors import CroftError
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
