"""The typed client of a host's node agent.

The node agent is not in discovery (it starts the services that are), so this client
is not a `ServiceClient`: it calls the agent at its address (the unix socket in the run
directory), on a channel opened for the call, as `croft` does from the command line.
"""

from __future__ import annotations

from typing import Any

import grpc

from croft.common.rpc import channel, from_rpc_error
from croft.v1 import node_pb2, node_pb2_grpc


class NodeClient:
    """One method per RPC of `croft.v1.Node`, named after it in snake_case; the callee's
    errors are raised as croft errors."""

    __slots__ = ("address",)

    def __init__(self, address: str) -> None:
        self.address = address

    async def status(
        self, request: node_pb2.NodeStatusRequest, *, timeout: float = 10.0
    ) -> node_pb2.NodeStatusReply:
        reply: node_pb2.NodeStatusReply = await self._call("Status", request, timeout)
        return reply

    async def scale(
        self, request: node_pb2.ScaleRequest, *, timeout: float = 10.0
    ) -> node_pb2.NodeStatusReply:
        reply: node_pb2.NodeStatusReply = await self._call("Scale", request, timeout)
        return reply

    async def shutdown(
        self, request: node_pb2.ShutdownRequest, *, timeout: float = 10.0
    ) -> node_pb2.ShutdownReply:
        reply: node_pb2.ShutdownReply = await self._call("Shutdown", request, timeout)
        return reply

    async def _call(self, method: str, request: Any, timeout: float) -> Any:
        async with channel(self.address) as ch:
            try:
                return await getattr(node_pb2_grpc.NodeStub(ch), method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
