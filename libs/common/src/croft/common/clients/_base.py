"""What every typed client shares: the `ServiceClient` it wraps.

A typed client is a thin layer over `croft.common.rpc.ServiceClient`, which stays the
transport (discovery, balancing, deadlines, retries, the member metadata). Each of its
methods names one RPC, takes that RPC's request message and is typed with its reply, so
go-to-definition crosses the gRPC hop. A unary method returns the transport's awaitable
itself rather than awaiting it: a call costs one plain function call more than before, no
extra coroutine. To add an RPC: one attribute in its service's module, named after the
RPC in snake case: a unary one is `rpc_name = unary("RpcName", TheRequest, TheReply)`, one
whose reply is a record (as JSON) returns its model (`croft.common.models`):
`rpc_name = record("RpcName", TheRequest, TheRecord)`. Both are typed with their messages,
so `client.rpc_name(request, timeout=5)` is checked. A call that needs more (building its
request from models, streams) is a method that uses `_unary` or `_record`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Iterable
from typing import Any, ClassVar, Generic, Protocol, Self, TypeAlias, TypedDict, TypeVar, overload

from typing_extensions import Unpack

from croft.common.discovery import Instance
from croft.common.models import Model
from croft.common.rpc import ServiceClient
from croft.v1 import common_pb2

T = TypeVar("T")
M = TypeVar("M", bound=Model)
Req = TypeVar("Req")
Rep = TypeVar("Rep")
Req_contra = TypeVar("Req_contra", contravariant=True)
Rep_co = TypeVar("Rep_co", covariant=True)

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


class UnaryCall(Protocol[Req_contra, Rep_co]):
    """A client's unary call: the request message, the call's options; the reply."""

    def __call__(
        self, request: Req_contra, /, **options: Unpack[CallOptions]
    ) -> Awaitable[Rep_co]: ...


class unary(Generic[Req, Rep]):  # noqa: N801 (used as a declaration: `x = unary(...)`)
    """One unary RPC of a typed client, declared as a class attribute:
    `is_trusted = unary("IsTrusted", auth_pb2.CertificateRef, auth_pb2.TrustReply)`.
    Read from a client, it is the call (the transport's awaitable, returned as is)."""

    __slots__ = ("method",)

    def __init__(self, method: str, request: type[Req], reply: type[Rep]) -> None:
        self.method = method

    @overload
    def __get__(self, client: None, owner: type[TypedClient]) -> Self: ...
    @overload
    def __get__(self, client: TypedClient, owner: type[TypedClient]) -> UnaryCall[Req, Rep]: ...
    def __get__(
        self, client: TypedClient | None, owner: type[TypedClient]
    ) -> Self | UnaryCall[Req, Rep]:
        if client is None:
            return self
        call, method = client.rpc.call, self.method

        def unary_call(request: Req, /, **options: Unpack[CallOptions]) -> Awaitable[Rep]:
            return call(method, request, **options)

        return unary_call

    def __call__(
        self, client: TypedClient, request: Req, /, **options: Unpack[CallOptions]
    ) -> Awaitable[Rep]:
        """The call through the class (`AuthClient.is_trusted(client, request)`), as an
        unbound method is called."""
        return self.__get__(client, type(client))(request, **options)


class record(Generic[Req, M]):  # noqa: N801 (used as a declaration: `x = record(...)`)
    """One unary RPC whose reply is a record (JSON in a `Json` message or a reply's
    `record` field), declared as a class attribute:
    `update_image = record("UpdateImage", common_pb2.Json, ImageRecord)`. Read from a
    client, it is the call, which returns the record as its model."""

    __slots__ = ("method", "model")

    def __init__(self, method: str, request: type[Req], model: type[M]) -> None:
        self.method = method
        self.model = model

    @overload
    def __get__(self, client: None, owner: type[TypedClient]) -> Self: ...
    @overload
    def __get__(self, client: TypedClient, owner: type[TypedClient]) -> UnaryCall[Req, M]: ...
    def __get__(
        self, client: TypedClient | None, owner: type[TypedClient]
    ) -> Self | UnaryCall[Req, M]:
        if client is None:
            return self
        typed, method, model = client, self.method, self.model

        def record_call(request: Req, /, **options: Unpack[CallOptions]) -> Awaitable[M]:
            return typed._record(method, request, options, model)

        return record_call

    def __call__(
        self, client: TypedClient, request: Req, /, **options: Unpack[CallOptions]
    ) -> Awaitable[M]:
        """The call through the class, as an unbound method is called."""
        return self.__get__(client, type(client))(request, **options)
