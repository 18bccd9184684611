"""The `lxc` client's own way of following an async operation (the events websocket,
opened before the request) against croft's operations. The endpoints here stand in for
the instance endpoints that plug into the same operation manager."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from croft.api import responses
from croft.api.context import context
from croft.api.operations import OperationContext
from croft.common.errors import InvalidArgument, NotFound
from croft.common.testing.etcd import EtcdServer

from .conftest import TEST_SETTINGS, Replica


def instance_stand_ins(app: FastAPI) -> None:
    async def get_instance(request: Request, name: str) -> Response:
        if name == "missing":
            raise NotFound("Instance not found")
        return responses.sync(
            {
                "name": name,
                "status": "Stopped",
                "status_code": 102,
                "type": "container",
                "ephemeral": False,
                "profiles": ["default"],
                "config": {},
                "devices": {},
                "expanded_config": {},
                "expanded_devices": {},
                "stateful": False,
            }
        )

    async def delete_instance(request: Request, name: str) -> Response:
        ctx = context(request)

        async def task(operation: OperationContext) -> dict[str, Any] | None:
            await asyncio.sleep(0.3)  # long enough for the client to be waiting
            if name == "stuck":
                raise InvalidArgument("Instance is busy")
            await ctx.lifecycle("instance-deleted", f"/1.0/instances/{name}", request=request)
            return None

        op = await ctx.operations.create(
            "Deleting instance", run=task, resources={"instances": [f"/1.0/instances/{name}"]}
        )
        return responses.async_operation(op)

    # Ahead of the real instance endpoints, so that this test depends on nothing but the
    # operations and events. (Without the "instances" API extension the client speaks of
    # /1.0/containers.)
    before = len(app.router.routes)
    for collection in ("instances", "containers"):
        app.add_api_route(f"/1.0/{collection}/{{name}}", get_instance, methods=["GET"])
        app.add_api_route(f"/1.0/{collection}/{{name}}", delete_instance, methods=["DELETE"])
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[:0] = added


@pytest.fixture
def replica_with_instances(clean_store: EtcdServer) -> Iterator[Replica]:
    r = Replica(clean_store.endpoints, TEST_SETTINGS, customize=instance_stand_ins).start()
    try:
        yield r
    finally:
        r.stop()


def test_lxc_waits_for_an_async_operation(replica_with_instances: Replica) -> None:
    replica = replica_with_instances
    result = replica.lxc("delete", "c1")
    assert result.returncode == 0
    (op,) = replica.request("GET", "/1.0/operations?recursion=1").metadata["success"]
    assert op["description"] == "Deleting instance"


def test_lxc_reports_a_failed_async_operation(replica_with_instances: Replica) -> None:
    result = replica_with_instances.lxc("delete", "stuck", check=False)
    assert result.returncode != 0
    assert "Instance is busy" in result.stderr


def test_lxc_query_wait(replica_with_instances: Replica) -> None:
    result = replica_with_instances.lxc("query", "-X", "DELETE", "--wait", "/1.0/instances/c2")
    assert result.returncode == 0
