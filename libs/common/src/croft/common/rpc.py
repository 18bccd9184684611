"""gRPC plumbing shared by every service.

Server side: `Server` wraps a grpc.aio server with the standard health service, the
common `croft.v1.Service/Status`, and interceptors that map croft errors to status codes,
log each call and continue the caller's trace. A per-host service (compute, storage,
network) refuses a call that names another member than its own (`croft-member`). Shutdown drains: health says NOT_SERVING,
the registration goes, the port stops accepting, in-flight calls finish within a grace.

Client side: `ServiceClient` calls one service through discovery: it picks among live
instances round-robin, puts a deadline on every call, carries the trace, and retries an
idempotent call on another instance when one is UNAVAILABLE. A client for one member's
service names that member in every call's metadata. Code calls a service through its
typed client (`croft.common.clients`), which wraps a `ServiceClient`; only those name an
RPC by string.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from croft.common import errors, internal_tls
from croft.common.discovery import Instance, Watcher
from croft.common.internal_tls import Identity
from croft.common.store import Store, observe, observed_all
from croft.common.telemetry import current_trace_id
from croft.v1 import common_pb2, common_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("croft.rpc")

VERSION = "0.1.0"


# ---------------------------------------------------------------------------- server side


# An error's message travels in gRPC's trailing metadata, which the caller refuses over
# 16 KiB ("Stream removed"), losing the error: a longer one is cut, saying so.
_MAX_MESSAGE = 4096


def _fitting(message: str) -> str:
    # Metadata is UTF-8: a lone surrogate from a client would fail to encode.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) <= _MAX_MESSAGE:
        return message
    return message[:_MAX_MESSAGE] + f"... ({len(message) - _MAX_MESSAGE} more characters)"


def _wrap_unary(behaviour: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _server_span(method, context):
            started = time.perf_counter()
            try:
                reply = await behaviour(request, context)
                context.set_trailing_metadata(_revisions_seen())
                return reply
            except errors.CroftError as exc:
                await context.abort(exc.grpc_code, _fitting(exc.message))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, _fitting(f"internal error: {exc}"))
            finally:
                log.debug("%s %.2f ms", method, (time.perf_counter() - started) * 1000)

    return handler


def _wrap_stream(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _server_span(method, context):
            try:
                async for reply in behaviour(request, context):
                    yield reply
            except errors.CroftError as exc:
                await context.abort(exc.grpc_code, _fitting(exc.message))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, _fitting(f"internal error: {exc}"))

    return handler


_REVISIONS = "croft-revisions"
# The member a call to a per-host service is meant for (ServiceClient(member=...)).
MEMBER_KEY = "croft-member"
# The services that run one per host and serve only their own member's things.
PER_HOST_SERVICES = frozenset({"compute", "storage", "network"})


def _revisions_seen() -> tuple[tuple[str, str], ...]:
    """What this process has seen of the store, for the caller: whatever it did before
    replying is then no news to a copy of the store the caller reads (store.mirror)."""
    seen = observed_all()
    return ((_REVISIONS, ",".join(f"{c:x}:{r:x}" for c, r in seen.items())),) if seen else ()


def _observe_revisions(metadata: Any) -> None:
    for key, value in metadata or ():
        if key == _REVISIONS:
            for pair in value.split(","):
                cluster, _, revision = pair.partition(":")
                with contextlib.suppress(ValueError):
                    observe(int(cluster, 16), int(revision, 16))


class _server_span:
    """Continue the caller's trace (W3C traceparent in metadata) for the call's duration."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self._ctx = propagate.extract(carrier)
        self._method = method

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._ctx)
        self._span = tracer.start_as_current_span(self._method, kind=trace.SpanKind.SERVER)
        self._span.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._span.__exit__(exc_type, exc, tb)
        otel_context.detach(self._token)


def _wrong_member(details: grpc.HandlerCallDetails, member: str) -> str | None:
    """The member a call names when it is not `member` (None when it names none or this
    one): one pass over a few metadata pairs, nothing more, per call."""
    for key, value in details.invocation_metadata or ():
        if key == MEMBER_KEY:
            return None if value == member else str(value)
    return None


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that refuses the call with `message`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        yield  # pragma: no cover (a generator, as a streaming handler must be)

    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, de, ser)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, de, ser)


class _ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str = "", member: str = "") -> None:
        # Only a per-host service checks whom a call is for.
        self._member = member if service in PER_HOST_SERVICES else ""
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health"):
            return handler
        if self._member:
            other = _wrong_member(details, self._member)
            if other is not None:
                return _refusal(
                    handler,
                    f"this {self._service} service serves member {self._member!r}, "
                    f"not {other!r} (the call reached the wrong member)",
                )
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        # A handler is exactly one of the four kinds: this one is stream-stream.
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )


class _StatusServicer(common_pb2_grpc.ServiceServicer):
    def __init__(self, server: Server) -> None:
        self.server = server

    async def Status(
        self, request: common_pb2.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.StatusReply:
        return self.server.status()


class Server:
    """A service's gRPC server: health, Status, interceptors, graceful drain."""

    def __init__(
        self,
        service: str,
        member: str,
        instance_id: str,
        host: str = "127.0.0.1",
        identity: Identity | None = None,
    ):
        self.service = service
        # With an identity, TCP is served only to clients with a certificate of the
        # member's authority (croft.common.internal_tls); a unix socket is the file's mode's.
        self.identity = identity
        self.member = member
        self.instance_id = instance_id
        self.host = host
        self.started = time.monotonic()
        self.address = ""
        self.grpc = grpc.aio.server(
            interceptors=[_ServerInterceptor(service, member)],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        common_pb2_grpc.add_ServiceServicer_to_server(_StatusServicer(self), self.grpc)

    def status(self) -> common_pb2.StatusReply:
        return common_pb2.StatusReply(
            service=self.service,
            member=self.member,
            instance_id=self.instance_id,
            version=VERSION,
            uptime=time.monotonic() - self.started,
            address=self.address,
            pid=os.getpid(),
            trace_id=current_trace_id(),
        )

    async def start(self, port: int = 0, unix_path: str | None = None) -> str:
        """Bind (an ephemeral port by default) and start; returns the address served."""
        if unix_path:
            self.grpc.add_insecure_port(f"unix:{unix_path}")
            self.address = f"unix:{unix_path}"
        else:
            target = f"{self.host}:{port}"
            if self.identity is not None:
                bound = self.grpc.add_secure_port(target, self.identity.server_credentials())
            else:
                bound = self.grpc.add_insecure_port(target)
            self.address = f"{self.host}:{bound}"
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(f"croft.v1.{self.service}", health_pb2.HealthCheckResponse.SERVING)
        return self.address

    async def stop(
        self, grace: float = 10.0, before_drain: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Say NOT_SERVING, run `before_drain` (deregistration), stop accepting, and let
        in-flight calls finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        if before_drain is not None:
            await before_drain()
        await self.grpc.stop(grace)


# ---------------------------------------------------------------------------- client side

StubT = TypeVar("StubT")
_RequestT = TypeVar("_RequestT")
_CallT = TypeVar("_CallT")

# How long an instance that answered UNAVAILABLE is skipped while others are live.
_QUARANTINE = 5.0

# How long a change for one member's service waits for that service to come back when it
# is down (the node agent restarts a dead service within seconds).
_RESTART_WAIT = 30.0


class _TraceClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    """Send the caller's trace context with every call, unary or server-streaming."""

    async def _intercept(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _RequestT], Awaitable[_CallT]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _RequestT,
    ) -> _CallT:
        return await continuation(_with_trace(client_call_details), request)

    intercept_unary_unary = intercept_unary_stream = _intercept


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return details
    metadata = list(details.metadata or ()) + list(carrier.items())
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


def channel(address: str, identity: Identity | None = None) -> grpc.aio.Channel:
    """A channel to a croft service with tracing: mutual TLS with `identity` over TCP,
    plain over a unix socket (or without an identity: in-process tests)."""
    options = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.enable_retries", 0),
        # Fail fast when an instance is gone, so the next one can be tried.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    interceptors = [_TraceClientInterceptor()]
    if identity is None or address.startswith("unix:"):
        return grpc.aio.insecure_channel(address, interceptors=interceptors, options=options)
    return grpc.aio.secure_channel(
        address,
        identity.channel_credentials(),
        interceptors=interceptors,
        options=options + internal_tls.GRPC_OPTIONS,
    )


def from_rpc_error(exc: grpc.aio.AioRpcError) -> errors.CroftError:
    return errors.from_grpc(exc.code(), exc.details() or exc.code().name)


class ServiceClient(Generic[StubT]):
    """Calls to one service through discovery, balanced over its live instances."""

    def __init__(
        self,
        store: Store,
        service: str,
        stub_factory: Callable[[grpc.aio.Channel], StubT],
        *,
        member: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.service = service
        self.member = member
        self.timeout = timeout
        self._stub_factory = stub_factory
        self._watcher = Watcher(store, service)
        self._identity = store.identity
        self._channels: dict[str, tuple[grpc.aio.Channel, StubT]] = {}
        self._next = 0
        self._quarantined: dict[str, float] = {}
        self._checks: set[asyncio.Future[None]] = set()
        # Every call to one member's service says which member it is for.
        self._metadata: tuple[tuple[str, str], ...] | None = (
            ((MEMBER_KEY, member),) if member is not None else None
        )

    async def start(self) -> ServiceClient[StubT]:
        await self._watcher.start()
        return self

    def instances(self) -> list[Instance]:
        live = [
            i for i in self._watcher.instances if self.member is None or i.member == self.member
        ]
        return sorted(live, key=lambda i: i.id)

    def _candidates(self) -> list[Instance]:
        now = time.monotonic()
        live = self.instances()
        healthy = [i for i in live if self._quarantined.get(i.id, 0) <= now]
        pool = healthy or live
        if not pool:
            return []
        self._next = (self._next + 1) % len(pool)
        # Round-robin start, then every other instance as a fallback.
        return pool[self._next :] + pool[: self._next]

    def _stub(self, instance: Instance) -> StubT:
        cached = self._channels.get(instance.address)
        if cached is None:
            ch = channel(instance.address, self._identity)
            cached = (ch, self._stub_factory(ch))
            self._channels[instance.address] = cached
        return cached[1]

    async def call(
        self,
        method: str,
        request: Any,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """Call `method` on one instance. Idempotent calls move on to another instance when
        one is UNAVAILABLE; the error raised is the croft error the callee raised.

        A non-idempotent call to one member's service (compute, storage, network of a
        host) that reached no instance waits, within its timeout, for that service to be
        back: the change was never seen, so it is made once the service restarts rather
        than reported failed (a start asked for just after compute died and came back)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        tried: set[str] = set()
        last: errors.CroftError | None = None
        while True:
            candidates = [i for i in self._candidates() if i.id not in tried]
            if not candidates and self.member and not idempotent:
                candidates = await self._restarted(tried, deadline)
            if not candidates:
                if last is not None:
                    raise last
                where = f" on {self.member}" if self.member else ""
                raise errors.Unavailable(f"no {self.service} service is running{where}")
            instance = candidates[0]
            tried.add(instance.id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.Timeout(f"{self.service}.{method} timed out")
            try:
                call = getattr(self._stub(instance), method)(
                    request, timeout=remaining, metadata=self._metadata
                )
                reply = await call
                _observe_revisions(await call.trailing_metadata())
                return reply
            except grpc.aio.AioRpcError as exc:
                last = from_rpc_error(exc)
                # No connection (a dead instance still registered): the callee never saw
                # the request, so even a non-idempotent call may go to another instance.
                never_sent = "failed to connect to all addresses" in (exc.details() or "")
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not (idempotent or never_sent):
                    raise last from None
                self._quarantined[instance.id] = time.monotonic() + _QUARANTINE
                log.info("%s at %s unavailable; trying another", self.service, instance.address)

    async def _restarted(self, tried: set[str], deadline: float) -> list[Instance]:
        """Instances not in `tried` once one registers (within `_RESTART_WAIT` and the
        call's deadline), or none."""
        wait = min(deadline - time.monotonic(), _RESTART_WAIT)
        if wait <= 0:
            return []

        def fresh(instances: list[Instance]) -> bool:
            return any(
                i.id not in tried and (self.member is None or i.member == self.member)
                for i in instances
            )

        try:
            await self._watcher.wait_for(fresh, wait)
        except TimeoutError:
            return []
        log.info("%s on %s is back", self.service, self.member)
        return [i for i in self._candidates() if i.id not in tried]

    def stream(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Open a streaming call (server, client or bidirectional) on one instance.
        Streams are not retried: they are not idempotent. Iterate the returned call for
        replies (or await it for a client stream's single reply); errors surface as
        grpc.aio.AioRpcError, which `from_rpc_error` turns into croft errors."""
        candidates = self._candidates()
        if not candidates:
            where = f" on {self.member}" if self.member else ""
            raise errors.Unavailable(f"no {self.service} service is running{where}")
        # A stream cannot be moved to another instance once opened, so prefer one whose
        # connection is up: a dead instance still registered (its lease not yet expired)
        # has lost its connection, a live one in use keeps it.
        ready = [i for i in candidates if self._is_connected(i)]
        instance = (ready or candidates)[0]
        call = getattr(self._stub(instance), method)(
            request, timeout=timeout, metadata=self._metadata
        )
        call.add_done_callback(lambda done: self._note_stream_end(instance, done))
        return call

    def _is_connected(self, instance: Instance) -> bool:
        cached = self._channels.get(instance.address)
        return cached is not None and (
            cached[0].get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY
        )

    def _note_stream_end(self, instance: Instance, call: Any) -> None:
        """A stream that could not connect puts its instance in quarantine, as a unary
        call's failure does, so that the next call goes elsewhere."""
        if call.cancelled():
            return

        async def check() -> None:
            with contextlib.suppress(Exception):
                code, details = await call.code(), await call.details()
                if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (details or ""):
                    self._quarantined[instance.id] = time.monotonic() + _QUARANTINE

        task = asyncio.ensure_future(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def close(self) -> None:
        await self._watcher.close()
        for ch, _ in self._channels.values():
            await ch.close()
        self._channels.clear()


async def status_of(
    address: str, timeout: float = 2.0, identity: Identity | None = None
) -> common_pb2.StatusReply:
    """Ask one instance directly for its Status."""
    async with channel(address, identity) as ch:
        reply: common_pb2.StatusReply = await common_pb2_grpc.ServiceStub(ch).Status(
            common_pb2.StatusRequest(), timeout=timeout
        )
    return reply


async def health_of(address: str, timeout: float = 2.0, identity: Identity | None = None) -> str:
    """SERVING, NOT_SERVING or UNREACHABLE."""
    try:
        async with channel(address, identity) as ch:
            # types-grpcio-health-checking declares HealthStub without its methods.
            stub: Any = health_pb2_grpc.HealthStub(ch)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError:
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
