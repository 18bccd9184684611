"""The etcd v3 backend of the store: a thin asyncio client over etcd's gRPC API.

The stubs come from our own minimal copy of etcd's protos (`libs/common/protos/croft/etcdpb`),
so no etcd client package (and no old protobuf) is needed.

Failover. There is one channel per endpoint; calls go to the current endpoint and, when it
fails with a transient error (UNAVAILABLE, DEADLINE_EXCEEDED: connection refused or reset,
"no leader", "leader changed", "request timed out"), move on to the next one, backing off a
little after each full round, until the call's deadline (`timeout`) passes. Then the caller
gets `Unavailable`, naming the endpoints and the last error.

Retries and unknown outcomes. A failure that happened before the request reached a member
(connection refused, "no leader") is safe to retry for anything. A failure after it was sent
(timeout, connection reset, "leader changed") leaves the outcome unknown, and we still retry:
- reads, leases and `delete_prefix`: the retry's answer is the truth;
- `put`: a retried unconditional write stores the same value again (one more revision and one
  more watch event at worst), which is what a put means anyway;
- `delete` without revision: if the retry finds the key gone, it counts as deleted;
- conditional writes (`create`, `update`, `delete` with revision, `transaction`): when the retry
  fails its compare, that may be because the first attempt did apply. We report the `Conflict`
  (or `NotFound`) as usual, and its message says the earlier attempt's outcome is unknown. A
  caller that retries on Conflict re-reads and sees its own write; only a non-idempotent
  read-modify-write (a counter) can then apply twice, and only across a failover.
etcd's own Go client makes the same trade for reads; it refuses to replay writes instead.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from croft.common import internal_tls
from croft.common.errors import (
    Conflict,
    CroftError,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from croft.common.internal_tls import Identity
from croft.common.store import (
    Compacted,
    Create,
    Delete,
    Entry,
    EventType,
    Lease,
    Operation,
    Put,
    Store,
    Update,
    WatchEvent,
    observe,
)
from croft.etcdpb import kv_pb2, rpc_pb2, rpc_pb2_grpc

log = logging.getLogger(__name__)

_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Details of failures that happened before the member accepted the request for apply.
_NOT_SENT = (
    "failed to connect",
    "connection refused",
    "no leader",
    "not capable",
    "not supported for learner",
)
_LIST_PAGE = 1000
_MAX_MESSAGE = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    # A restarted member should be found again within a second, not after grpc's 2-minute cap.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a member that vanished without closing the connection (watch streams are idle).
    # etcd's default --grpc-keepalive-min-time is 5 s; pinging more often gets us cut off.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Makes a member without a leader end our watch stream instead of leaving it silent.
_REQUIRE_LEADER = (("hasleader", "true"),)


@dataclass
class _Connection:
    endpoint: str
    channel: grpc.aio.Channel
    kv: rpc_pb2_grpc.KVStub
    watch: rpc_pb2_grpc.WatchStub
    lease: rpc_pb2_grpc.LeaseStub
    maintenance: rpc_pb2_grpc.MaintenanceStub


@dataclass
class _Answer:
    response: Any
    # An earlier attempt failed after the request was sent: it may have been applied.
    maybe_applied_before: bool


class EtcdStore(Store):
    """The store on an etcd v3 cluster, reached at `endpoints` (`http://host:port` or
    `host:port`; `https://` uses mutual TLS with the member's `identity`, or the system's
    roots without one). Every call gives up with `Unavailable` after `timeout` seconds
    without an answer from any endpoint."""

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 5.0, identity: Identity | None = None
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise InvalidArgument("the etcd store needs a list of one or more endpoints")
        if timeout <= 0:
            raise InvalidArgument(f"etcd timeout must be positive, not {timeout}")
        self.endpoints = [str(e) for e in endpoints]
        self.timeout = timeout
        self.identity = identity
        self._connections: list[_Connection] = []
        self._current = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open a channel per endpoint and check that at least one member answers.
        Raises Unavailable (and leaves nothing open) when none does."""
        if self._connections:
            return
        for endpoint in self.endpoints:
            self._connections.append(_connect(endpoint, self.identity))
        try:
            await self._unary(lambda c: c.maintenance.Status, rpc_pb2.StatusRequest(), "reach etcd")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        connections, self._connections = self._connections, []
        for connection in connections:
            await connection.channel.close()

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        _check_key(key)
        answer = await self._unary(
            lambda c: c.kv.Range, rpc_pb2.RangeRequest(key=key.encode()), f"read {key!r}"
        )
        kvs = answer.response.kvs
        return _entry(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> list[Entry]:
        return await self.list_at(prefix, 0)

    async def list_at(self, prefix: str, revision: int) -> builtins.list[Entry]:
        """Every entry under `prefix` at `revision` (0: now). The pages of a long listing
        are read at the revision of the first, so that they all show one moment."""
        pinned = revision
        start, end = _prefix_range(prefix)
        entries: list[Entry] = []
        while True:
            request = rpc_pb2.RangeRequest(
                key=start,
                range_end=end,
                limit=_LIST_PAGE,
                revision=pinned,
                sort_order=rpc_pb2.RangeRequest.ASCEND,
                sort_target=rpc_pb2.RangeRequest.KEY,
            )
            try:
                answer = await self._unary(lambda c: c.kv.Range, request, f"list {prefix!r}")
            except Compacted:
                if revision:
                    raise
                # Compacted between two pages: start again at the newest revision.
                start, end = _prefix_range(prefix)
                entries, pinned = [], 0
                continue
            response = answer.response
            pinned = revision or response.header.revision
            entries.extend(_entry(kv) for kv in response.kvs)
            if not response.more or not response.kvs:
                return entries
            start = response.kvs[-1].key + b"\0"

    async def revision(self) -> int:
        # A count of one key is the cheapest linearizable read; its header is the revision.
        request = rpc_pb2.RangeRequest(key=b"\0", count_only=True)
        answer = await self._unary(lambda c: c.kv.Range, request, "read the store revision")
        return int(answer.response.header.revision)

    # -- writes ---------------------------------------------------------------------------

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> Entry:
        return await self._write_one(Create(key, value, lease))

    async def update(self, key: str, value: bytes, *, revision: int, lease: int = 0) -> Entry:
        return await self._write_one(Update(key, value, revision, lease))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> Entry:
        return await self._write_one(Put(key, value, lease))

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        if revision is not None:
            await self._transaction([Delete(key, revision)], f"delete {key!r}")
            return
        _check_key(key)
        answer = await self._unary(
            lambda c: c.kv.DeleteRange,
            rpc_pb2.DeleteRangeRequest(key=key.encode()),
            f"delete {key!r}",
        )
        if answer.response.deleted == 0 and not answer.maybe_applied_before:
            raise NotFound(f"{key!r} does not exist")

    async def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidArgument("refusing to delete every key: the prefix is empty")
        start, end = _prefix_range(prefix)
        answer = await self._unary(
            lambda c: c.kv.DeleteRange,
            rpc_pb2.DeleteRangeRequest(key=start, range_end=end),
            f"delete keys under {prefix!r}",
        )
        return int(answer.response.deleted)

    async def transaction(self, operations: Sequence[Operation]) -> int:
        response = await self._transaction(list(operations), "apply a transaction")
        return int(response.header.revision)

    async def _write_one(self, op: Create | Update | Put) -> Entry:
        # Only an overwrite needs the previous version (for the entry's create_revision
        # and version); etcd reads it for every put that asks.
        response = await self._transaction(
            [op], f"write {op.key!r}", previous=not isinstance(op, Create)
        )
        revision = int(response.header.revision)
        previous = response.responses[0].response_put.prev_kv
        existed = isinstance(op, Update) or (isinstance(op, Put) and previous.key != b"")
        return Entry(
            key=op.key,
            value=op.value,
            revision=revision,
            create_revision=int(previous.create_revision) if existed else revision,
            version=int(previous.version) + 1 if existed else 1,
            lease=op.lease,
        )

    async def _transaction(
        self, operations: builtins.list[Operation], what: str, *, previous: bool = False
    ) -> Any:
        """One etcd Txn: a compare per conditional operation, every operation on success, and
        on failure a read of each compared key, so that the error can name what changed.
        `previous`: each put's response carries the value it replaced."""
        _check_operations(operations)
        request = rpc_pb2.TxnRequest()
        conditional: list[Create | Update | Delete] = []
        for op in operations:
            key = op.key.encode()
            if isinstance(op, Create):
                request.compare.append(
                    rpc_pb2.Compare(
                        key=key,
                        target=rpc_pb2.Compare.CREATE,
                        result=rpc_pb2.Compare.EQUAL,
                        create_revision=0,
                    )
                )
                conditional.append(op)
            elif isinstance(op, Update | Delete) and op.revision is not None:
                request.compare.append(
                    rpc_pb2.Compare(
                        key=key,
                        target=rpc_pb2.Compare.MOD,
                        result=rpc_pb2.Compare.EQUAL,
                        mod_revision=op.revision,
                    )
                )
                conditional.append(op)
            if isinstance(op, Delete):
                request.success.append(
                    rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))
                )
            else:
                put = rpc_pb2.PutRequest(
                    key=key, value=bytes(op.value), lease=op.lease, prev_kv=previous
                )
                request.success.append(rpc_pb2.RequestOp(request_put=put))
        for op in conditional:
            request.failure.append(
                rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=op.key.encode()))
            )
        answer = await self._unary(lambda c: c.kv.Txn, request, what)
        response = answer.response
        if not response.succeeded:
            current = [
                r.response_range.kvs[0] if r.response_range.kvs else None
                for r in response.responses
            ]
            raise _failed_condition(conditional, current, answer.maybe_applied_before)
        return response

    # -- watch ----------------------------------------------------------------------------

    async def watch(
        self, prefix: str, *, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Changes under `prefix` after `start_revision` (exclusive), in revision order.

        Without `start_revision`, "now" is when iteration starts (this is a generator): to see
        every change after a read, pass the read's revision. The stream moves to another
        endpoint when its member fails and resumes after the last event delivered, so nothing
        is lost or repeated; it raises `Unavailable` when no member takes it back within the
        timeout, and `Compacted` when the history it needs is gone. Closing the generator
        (`aclose()`, or leaving an `async with contextlib.aclosing(...)`) cancels the watch."""
        if start_revision is not None and start_revision < 0:
            raise InvalidArgument(f"watch start revision must be >= 0, not {start_revision}")
        key, range_end = _prefix_range(prefix)
        next_revision = 0 if start_revision is None else start_revision + 1
        while True:
            call, created_at, index = await self._open_watch(prefix, key, range_end, next_revision)
            if next_revision == 0:
                # Pin "now": a stream re-opened later resumes from here, not from its own now.
                next_revision = created_at + 1
            floor = next_revision
            try:
                while True:
                    try:
                        response = await call.read()
                    except grpc.aio.AioRpcError as error:
                        if (
                            error.code() not in _TRANSIENT
                            and error.code() != grpc.StatusCode.CANCELLED
                        ):
                            raise _translate(error, f"watch {prefix!r}") from None
                        log.info("etcd watch on %r lost (%s); resuming", prefix, error.details())
                        break
                    if response is grpc.aio.EOF:
                        break
                    if response.canceled or response.compact_revision:
                        raise _watch_cancelled(prefix, next_revision, response)
                    self._observe(response.header)
                    # etcd sends all events of a revision (a transaction's) in one response,
                    # so a stream can only break between revisions: resuming at the one after
                    # the last event delivered neither repeats nor skips anything.
                    for event in response.events:
                        revision = int(event.kv.mod_revision)
                        if revision < floor:
                            continue  # never hand out an event twice, whatever a member sends
                        next_revision = revision + 1
                        yield _watch_event(event)
            finally:
                call.cancel()
            self._advance(index)

    async def _open_watch(
        self, prefix: str, key: bytes, range_end: bytes, start_revision: int
    ) -> tuple[Any, int, int]:
        """A Watch stream with our watcher created on it, the revision it was created at, and
        the index of the endpoint it runs on."""
        create = rpc_pb2.WatchRequest(
            create_request=rpc_pb2.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=start_revision
            )
        )

        async def attempt(connection: _Connection, timeout: float) -> tuple[Any, int, int]:
            call = connection.watch.Watch(metadata=_REQUIRE_LEADER)
            try:
                async with asyncio.timeout(timeout):
                    await call.write(create)
                    response = await call.read()
            except TimeoutError:
                call.cancel()
                raise _DeadlineExceeded() from None
            except BaseException:
                call.cancel()
                raise
            if response is grpc.aio.EOF:
                call.cancel()
                raise _StreamEnded()
            if response.canceled or response.compact_revision:
                call.cancel()
                raise _watch_cancelled(prefix, start_revision, response)
            return call, int(response.header.revision), self._connections.index(connection)

        result: tuple[Any, int, int] = await self._attempts(attempt, f"watch {prefix!r}")
        return result

    # -- leases ---------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl <= 0:
            raise InvalidArgument(f"a lease TTL must be a positive number of seconds, not {ttl}")
        answer = await self._unary(
            lambda c: c.lease.LeaseGrant,
            rpc_pb2.LeaseGrantRequest(TTL=ttl),
            f"grant a {ttl}s lease",
        )
        response = answer.response
        if response.error:
            raise Internal(f"etcd refused a {ttl}s lease: {response.error}")
        return Lease(id=int(response.ID), ttl=int(response.TTL))

    async def keep_alive(self, lease: Lease) -> None:
        """Refresh `lease` once through a short LeaseKeepAlive stream. NotFound if it expired
        or was revoked."""
        request = rpc_pb2.LeaseKeepAliveRequest(ID=lease.id)

        async def attempt(connection: _Connection, timeout: float) -> Any:
            call = connection.lease.LeaseKeepAlive(timeout=timeout)
            try:
                await call.write(request)
                await call.done_writing()
                response = await call.read()
            finally:
                call.cancel()
            if response is grpc.aio.EOF:
                raise _StreamEnded()
            return response

        response = await self._attempts(attempt, f"keep lease {lease.id:x} alive")
        if response.TTL <= 0:
            raise NotFound(f"lease {lease.id:x} does not exist (it expired or was revoked)")
        lease.ttl = int(response.TTL)

    async def revoke_lease(self, lease: Lease) -> None:
        await self._unary(
            lambda c: c.lease.LeaseRevoke,
            rpc_pb2.LeaseRevokeRequest(ID=lease.id),
            f"revoke lease {lease.id:x}",
        )

    async def lease_ttl(self, lease: Lease) -> int:
        """Seconds `lease` has left. NotFound if it expired or was revoked."""
        answer = await self._unary(
            lambda c: c.lease.LeaseTimeToLive,
            rpc_pb2.LeaseTimeToLiveRequest(ID=lease.id),
            f"read lease {lease.id:x}",
        )
        if answer.response.TTL < 0:
            raise NotFound(f"lease {lease.id:x} does not exist (it expired or was revoked)")
        return int(answer.response.TTL)

    # -- calls and failover ---------------------------------------------------------------

    async def _unary(
        self, method: Callable[[_Connection], Any], request: Any, what: str
    ) -> _Answer:
        maybe_applied = False

        async def attempt(connection: _Connection, timeout: float) -> Any:
            nonlocal maybe_applied
            try:
                return await method(connection)(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if error.code() in _TRANSIENT and not _surely_not_sent(error):
                    maybe_applied = True
                raise

        response = await self._attempts(attempt, what)
        self._observe(response.header)
        return _Answer(response, maybe_applied)

    def _observe(self, header: Any) -> None:
        if not self.cluster:
            self.cluster = int(header.cluster_id)
        observe(self.cluster, int(header.revision))

    async def _attempts(self, attempt: Callable[[_Connection, float], Any], what: str) -> Any:
        """Run `attempt` on the current endpoint, then on the next ones while they fail
        transiently, until one answers or the deadline passes (then Unavailable)."""
        if not self._connections:
            raise Unavailable("the etcd store is not started (or already closed)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        count = len(self._connections)
        # One member must not eat the whole budget when others could answer: a follower that
        # lost its leader holds a write for 5 s before it says "request timed out".
        attempt_cap = self.timeout if count == 1 else max(self.timeout / 4, 1.0)
        last_error = "no answer"
        backoff = 0.05
        while True:
            first = self._current
            for step in range(count):
                index = (first + step) % count
                connection = self._connections[index]
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._unavailable(what, last_error)
                try:
                    result = await attempt(connection, min(remaining, attempt_cap))
                except grpc.aio.AioRpcError as error:
                    if error.code() not in _TRANSIENT:
                        raise _translate(error, what) from None
                    last_error = f"{connection.endpoint}: {error.details() or error.code().name}"
                except _Retryable as error:
                    last_error = f"{connection.endpoint}: {error}"
                else:
                    self._current = index
                    return result
                log.debug("etcd: %s failed at %s; trying the next endpoint", what, last_error)
                self._advance(index)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._unavailable(what, last_error)
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 0.5)

    def _advance(self, failed: int) -> None:
        # Only the first of several concurrent failures on one endpoint moves us on.
        if self._current == failed and self._connections:
            self._current = (failed + 1) % len(self._connections)

    def _unavailable(self, what: str, last_error: str) -> Unavailable:
        return Unavailable(
            f"etcd is unavailable: could not {what}; none of {', '.join(self.endpoints)} "
            f"answered within {self.timeout:g}s (last error: {last_error})"
        )


# -- helpers --------------------------------------------------------------------------------


class _Retryable(Exception):
    pass


class _DeadlineExceeded(_Retryable):
    def __str__(self) -> str:
        return "no answer in time"


class _StreamEnded(_Retryable):
    def __str__(self) -> str:
        return "the stream ended"


def etcd_channel(
    endpoint: str, identity: Identity | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to the etcd at `endpoint` (http://host:port plain; https://host:port
    mutual TLS with `identity`, or the system's roots without one)."""
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if url.scheme not in ("http", "https") or not url.hostname or not url.port:
        raise InvalidArgument(f"bad etcd endpoint {endpoint!r}: expected http://host:port")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    target = f"{host}:{url.port}"
    if url.scheme == "http":
        return grpc.aio.insecure_channel(target, options=list(options))
    if identity is None:
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), options=list(options)
        )
    return grpc.aio.secure_channel(
        target, identity.channel_credentials(), options=[*options, *internal_tls.GRPC_OPTIONS]
    )


def _connect(endpoint: str, identity: Identity | None) -> _Connection:
    channel = etcd_channel(endpoint, identity, _CHANNEL_OPTIONS)
    return _Connection(
        endpoint=endpoint,
        channel=channel,
        kv=rpc_pb2_grpc.KVStub(channel),
        watch=rpc_pb2_grpc.WatchStub(channel),
        lease=rpc_pb2_grpc.LeaseStub(channel),
        maintenance=rpc_pb2_grpc.MaintenanceStub(channel),
    )


def _surely_not_sent(error: grpc.aio.AioRpcError) -> bool:
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _NOT_SENT)


def _translate(error: grpc.aio.AioRpcError, what: str) -> CroftError:
    details = error.details() or error.code().name
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        if "lease" in details:
            return NotFound(f"could not {what}: the lease does not exist (expired or revoked)")
        return NotFound(f"could not {what}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"could not {what}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(f"could not {what}: {details}", 0)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Unavailable(f"could not {what}: etcd is overloaded or full ({details})")
    return Internal(f"could not {what}: etcd answered {code.name}: {details}")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"a store key must be a non-empty string, not {key!r}")


def _check_operations(operations: list[Operation]) -> None:
    seen: set[str] = set()
    for op in operations:
        if not isinstance(op, Create | Update | Put | Delete):
            raise InvalidArgument(f"not a store operation: {op!r}")
        _check_key(op.key)
        if op.key in seen:
            raise InvalidArgument(f"a transaction may touch {op.key!r} only once")
        seen.add(op.key)
        if isinstance(op, Create | Update | Put):
            if not isinstance(op.value, bytes | bytearray):
                raise InvalidArgument(f"the value for {op.key!r} must be bytes")
            if op.lease < 0:
                raise InvalidArgument(f"bad lease id {op.lease} for {op.key!r}")
        if isinstance(op, Update | Delete) and op.revision is not None and op.revision <= 0:
            raise InvalidArgument(f"bad revision {op.revision} for {op.key!r}: must be > 0")


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for every key starting with `prefix`."""
    if not isinstance(prefix, str):
        raise InvalidArgument(f"a key prefix must be a string, not {prefix!r}")
    start = prefix.encode()
    if not start:
        return b"\0", b"\0"  # etcd: every key
    end = bytearray(start)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return start, b"\0"
    end[-1] += 1
    return start, bytes(end)


def _entry(kv: kv_pb2.KeyValue) -> Entry:
    return Entry(
        key=kv.key.decode(),
        value=bytes(kv.value),
        revision=int(kv.mod_revision),
        create_revision=int(kv.create_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _watch_event(event: kv_pb2.Event) -> WatchEvent:
    if event.type == kv_pb2.Event.DELETE:
        return WatchEvent(EventType.DELETE, event.kv.key.decode(), b"", int(event.kv.mod_revision))
    kv = event.kv
    return WatchEvent(
        EventType.PUT,
        kv.key.decode(),
        bytes(kv.value),
        int(kv.mod_revision),
        create_revision=int(kv.create_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _watch_cancelled(prefix: str, start_revision: int, response: Any) -> CroftError:
    if response.compact_revision:
        return Compacted(
            f"cannot watch {prefix!r} from revision {start_revision}: the store's history "
            f"before revision {response.compact_revision} was compacted; list again and "
            f"watch from the listing's revision",
            int(response.compact_revision),
        )
    reason = response.cancel_reason or "no reason given"
    return Internal(f"etcd cancelled the watch on {prefix!r}: {reason}")


def _failed_condition(
    conditional: Sequence[Create | Update | Delete],
    current: Sequence[kv_pb2.KeyValue | None],
    maybe_applied_before: bool,
) -> CroftError:
    """The error for a Txn whose compare failed, naming every key whose condition broke."""
    problems: list[CroftError] = []
    for op, kv in zip(conditional, current, strict=True):
        if isinstance(op, Create):
            if kv is not None:
                problems.append(
                    Conflict(
                        f"{op.key!r} already exists (created at revision {kv.create_revision})"
                    )
                )
        elif kv is None:
            problems.append(
                NotFound(f"{op.key!r} does not exist (expected revision {op.revision})")
            )
        elif kv.mod_revision != op.revision:
            problems.append(
                Conflict(f"{op.key!r} changed since revision {op.revision} (now {kv.mod_revision})")
            )
    if not problems:
        return Conflict("the transaction's conditions failed, but every key now looks as expected")
    first = problems[0]
    message = first.message
    if len(problems) > 1:
        message += "; also " + "; ".join(p.message for p in problems[1:])
    if maybe_applied_before:
        message += (
            " (an earlier attempt was interrupted by a failover and may have applied this very "
            "write; read it again)"
        )
    return type(first)(message)
