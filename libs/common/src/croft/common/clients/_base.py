"""What every typed client shares: the `ServiceClient` it wraps.

A typed client is a thin layer over `croft.common.rpc.ServiceClient`, which stays the
transport (discovery, balancing, deadlines, retries, the member metadata). Each of its
methods names one RPC, takes that RPC's request message and is typed with its reply, so
go-to-definition crosses the gRPC hop. A unary method returns the transport's awaitable
itself rather than awaiting it: a call costs one plain function call more than before, no
extra coroutine. To add an RPC: one method in its service's module, named after the RPC;
a unary one is `return self._unary("Rpc", request, options)`, typed with its messages; one
whose reply is a record (as JSON) returns its model (`croft.common.models`):
`return self._record("Rpc", request, options, TheRecord)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Iterable
from typing import Any, ClassVar, TypeAlias, TypedDict, TypeVar

from croft.common.discovery import Instance
from croft.common.models import Model
from croft.common.rpc import ServiceClient
from croft.v1 import common_pb2

T = TypeVar("T")
M = TypeVar("M", bound=Model)

# What a client-streaming RPC sends: the messages, produced as they come or all at once.
RequestStream: TypeAlias = AsyncIterable[T] | Iterable[T]


class CallOptions(TypedDict, total=False):
    """The options of a unary call, as `ServiceClient.call` takes them."""

    #: Whether the call may be sent again to another instance (default True).
    idempotent: bool
    #: The call's deadline in seconds (default: the transport's).
    timeout: float | None


class TypedClient:
    """The calls to one service (one member's, for a per-host service): one method per
    RPC of the service, named after it in snake_case.

    A client names its service and the service's stub as class arguments:
    `class StorageClient(TypedClient, service="storage", stub=StorageStub)`."""

    #: The service's name in discovery.
    service: ClassVar[str]
    #: The generated stub class that `ServiceClient` makes per channel.
    # (A class, not a Callable: mypy would take a Callable class attribute for a method.)
    stub: ClassVar[type[Any]]

    __slots__ = ("rpc",)

    def __init_subclass__(
        cls, *, service: str | None = None, stub: type[Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if service is not None:
            cls.service = service
        if stub is not None:
            cls.stub = stub

    def __init__(self, rpc: ServiceClient[Any]) -> None:
        self.rpc = rpc

    @property
    def member(self) -> str | None:
        """The member whose service this client calls (None: any instance)."""
        return self.rpc.member

    def instances(self) -> list[Instance]:
        """The live instances of the service this client can call."""
        return self.rpc.instances()

    def _unary(self, method: str, request: Any, options: CallOptions) -> Awaitable[Any]:
        """Call the unary RPC `method`; each typed method gives it its precise types."""
        return self.rpc.call(method, request, **options)

    async def _record(self, method: str, request: Any, options: CallOptions, model: type[M]) -> M:
        """Call the unary RPC `method`, whose reply is a record, and return it as `model`."""
        reply = await self.rpc.call(method, request, **options)
        # A record comes as a `Json` message, or in the `record` field of a reply.
        text = reply.json if isinstance(reply, common_pb2.Json) else reply.record
        return model.model_validate_json(text)
