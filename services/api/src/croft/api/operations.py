"""LXD operations that any api replica can report on, wait for and cancel.

An operation is a record in the store, `/croft/operations/<uuid>`:

    {"operation": <LXD operation object>, "project": "default", "owner": "<owner id>",
     "runs_task": true, "cancel_requested": false, "expires_at": null,
     "done_if_created": null}

The replica that created it ("owner") runs its task in-process and is the only writer of
its progress; every change is also published as an LXD `operation` event, which is what
the `lxc` client waits on. Readers anywhere follow the record with a store watch, so
`/wait` works on any replica.

Each owner keeps `/croft/operation-owners/<owner id>` alive under a lease. When an owner
dies its key vanishes, and whichever replica's reaper notices first marks the owner's
unfinished operations `Failure` with "the api replica running this operation stopped".
An operation whose task creates one record (`done_if_created`) may have finished its
work just before its owner died: the reaper reports it `Success` when that record exists,
complete, and is younger than the operation.
Finished operations are deleted `keep_finished` seconds after they end (LXD: 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from starlette.websockets import WebSocket

from croft.common.errors import (
    Conflict,
    CroftError,
    InvalidArgument,
    NotFound,
    Timeout,
    Unavailable,
)
from croft.common.events import EventPublisher, rfc3339_nano
from croft.common.events import publisher as default_publisher
from croft.common.models import InstanceRecord
from croft.common.store import (
    Compacted,
    Create,
    EventType,
    Lease,
    Operation,
    Store,
    Update,
    dump,
)

log = logging.getLogger(__name__)

OPERATIONS_PREFIX = "/croft/operations/"
OWNERS_PREFIX = "/croft/operation-owners/"
ORPHANED = "the api replica running this operation stopped"

STATUS_CODES: dict[str, int] = {
    "Running": 103,
    "Cancelling": 104,
    "Pending": 105,
    "Success": 200,
    "Failure": 400,
    "Cancelled": 401,
}
FINAL = frozenset({"Success", "Failure", "Cancelled"})

OperationClass = Literal["task", "websocket", "token"]

# How many times the end of an operation is tried before it is left to the reaper.
_END_ATTEMPTS = 6


def operation_key(op_id: str) -> str:
    return f"{OPERATIONS_PREFIX}{op_id}"


def operation_url(op_id: str) -> str:
    return f"/1.0/operations/{op_id}"


class OperationContext:
    """What an operation's task gets: its id, and a way to publish progress."""

    def __init__(self, manager: OperationManager, op_id: str, project: str) -> None:
        self.manager = manager
        self.id = op_id
        self.project = project
        self.cancelling = False
        # Writes that go in the transaction recording the operation's end (an event
        # about what it did, say): listeners see them just before its final state.
        self.final_writes: list[Operation] = []
        # The end went in with another service's change (`closing_writes`).
        self.closed = False
        # The store key of the record the task creates (`done_if_created`), and the
        # revision the operation was recorded at: what tells a lost reply from a failure.
        self.done_if_created: str | None = None
        self.created_revision = 0

    @property
    def url(self) -> str:
        return operation_url(self.id)

    async def update_metadata(self, metadata: dict[str, Any] | None) -> None:
        """Replace the operation's metadata (LXD's UpdateMetadata), e.g. with progress;
        readers and `/1.0/events` listeners see it at once."""

        def change(op: dict[str, Any]) -> None:
            op["metadata"] = metadata

        await self.manager._change(self.id, change)

    async def closing_writes(self) -> list[Operation]:
        """The writes that end this operation with Success (its final record, then its
        event, after `final_writes`), for the one service call that does its work to
        commit with its change (`croft.common.riders`): then set `closed` when that
        service says they went in, and return no metadata. Empty when they cannot be
        made ahead (the record's revision is not known here, no lease for it)."""
        return await self.manager._closing(self)


Task = Callable[[OperationContext], Awaitable[dict[str, Any] | None]]


def calling(work: Callable[[], Awaitable[Any]]) -> Task:
    """The task of an operation that awaits `work` and has no metadata to give."""

    async def run(op: OperationContext) -> dict[str, Any] | None:
        await work()
        return None

    return run


class WebsocketHandler(Protocol):
    """The hook of a `websocket`-class operation (exec, console, migration).

    `connect` is called for `GET /1.0/operations/<id>/websocket?secret=<secret>` on the
    replica that owns the operation, with the websocket not yet accepted. It accepts it
    and serves it until done, or raises PermissionDenied for a secret it does not know
    (the client then gets 403 and nothing is accepted).
    """

    async def connect(self, operation: OperationContext, secret: str, websocket: WebSocket) -> None:
        """Serve one websocket of the operation."""


@dataclass
class _Local:
    context: OperationContext
    task: asyncio.Task[None] | None = None
    websocket: WebsocketHandler | None = None
    # The record as this process last wrote it, and its revision: the next change of our
    # own operation needs no read (a compare-and-swap still catches anyone else's write).
    last: tuple[bytes, int] | None = None


@dataclass
class OperationManager:
    """Creates, runs and reports operations for one api process.

    `owner_id` names this process (not the replica: a restarted replica is a new owner);
    `lease_ttl` is how long after this process dies its operations are reported failed.
    """

    store: Store
    owner_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    location: str = "none"
    lease_ttl: int = 10
    keep_finished: float = 5.0
    # How long a service may take to commit an operation's end handed to it: that end's
    # lease and expiry outlive `keep_finished` by this much. Later, the end goes alone.
    ride_span: float = 3.0
    keep_orphaned: float = 300.0
    reap_interval: float | None = None  # default: lease_ttl / 2
    events: EventPublisher | None = None

    _local: dict[str, _Local] = field(default_factory=dict, init=False)
    _background: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _expiries: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _lease: Lease | None = field(default=None, init=False)
    # Leases of finished operations by TTL, each with when it was granted.
    _end_leases: dict[int, tuple[Lease, float]] = field(default_factory=dict, init=False)
    _started: bool = field(default=False, init=False)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Announce this owner and start the liveness, reaper and cancel-request loops."""
        if self.events is None:
            self.events = default_publisher(self.store)
        await self._announce()
        self._background = [
            asyncio.create_task(self._keep_alive_loop(), name="operations-liveness"),
            asyncio.create_task(self._reap_loop(), name="operations-reaper"),
            asyncio.create_task(self._cancel_requests_loop(), name="operations-cancels"),
        ]
        self._started = True

    async def close(self, grace: float = 0.0) -> None:
        """Stop: give running tasks `grace` seconds, then cancel them and report them
        failed; withdraw the liveness key so that nobody waits for a lease to expire."""
        tasks = [local.task for local in self._local.values() if local.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for op_id, local in list(self._local.items()):
            if local.task is None and local.websocket is None:
                continue  # a token: it outlives this process
            if local.task is not None and not local.task.done():
                local.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await local.task
            # Once: stopping does not wait on a store that does not answer (the reaper
            # of another replica fails what this could not).
            await self._finish_quietly(op_id, "Failure", ORPHANED, attempts=1)
        for task in [*self._background, *self._expiries]:
            task.cancel()
        for task in [*self._background, *self._expiries]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()
        self._expiries.clear()
        if self._lease is not None:
            with contextlib.suppress(CroftError):
                await self.store.revoke_lease(self._lease)
            self._lease = None
        self._started = False

    async def _announce(self) -> None:
        self._lease = await self.store.grant_lease(self.lease_ttl)
        await self.store.put(
            f"{OWNERS_PREFIX}{self.owner_id}",
            dump({"location": self.location, "started_at": rfc3339_nano()}),
            lease=self._lease.id,
        )

    async def _keep_alive_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.lease_ttl / 3, 0.2))
            try:
                assert self._lease is not None
                await self.store.keep_alive(self._lease)
            except NotFound:
                # Our lease expired (store unreachable for too long): our operations may
                # have been reported failed already; come back for the new ones.
                log.warning("operation owner %s lost its lease; re-announcing", self.owner_id)
                with contextlib.suppress(CroftError):
                    await self._announce()
            except CroftError as exc:
                log.warning("operation owner %s keep-alive failed: %s", self.owner_id, exc)

    # -- creating and running -----------------------------------------------------------

    async def create(
        self,
        description: str,
        *,
        run: Task | None = None,
        cls: OperationClass = "task",
        resources: dict[str, list[str]] | None = None,
        metadata: dict[str, Any] | None = None,
        may_cancel: bool = False,
        project: str = "default",
        websocket: WebsocketHandler | None = None,
        done_if_created: str | None = None,
    ) -> dict[str, Any]:
        """Record a new Running operation, start `run` in this process and return the
        LXD operation object (for the 202 response).

        `run` returns extra metadata (merged into the operation's) or None; raising a
        CroftError makes the operation `Failure` with its message as `err`. A `token`
        operation has no `run`: it stays Running until cancelled.

        `done_if_created` is the store key of the record that `run` creates, when creating
        it is the whole of its work (an instance, say). Should this process die before it
        records the end, the replica that reaps the operation reports `Success` if that
        record exists, complete (its `_croft.state` is not "creating") and created after
        the operation, and `Failure` otherwise.
        """
        if not self._started:
            raise Unavailable("the operation manager is not started")
        if run is None and cls != "token" and websocket is None:
            raise ValueError("only token and websocket operations may have no task")
        op_id = str(uuid.uuid4())
        now = rfc3339_nano()
        operation: dict[str, Any] = {
            "id": op_id,
            "class": cls,
            "description": description,
            "created_at": now,
            "updated_at": now,
            "status": "Running",
            "status_code": STATUS_CODES["Running"],
            "resources": resources,
            "metadata": metadata,
            "may_cancel": may_cancel or cls == "token",
            "err": "",
            "location": self.location,
        }
        record = {
            "operation": operation,
            "project": project,
            "owner": self.owner_id,
            "runs_task": run is not None,
            "cancel_requested": False,
            "expires_at": None,
            "done_if_created": done_if_created,
        }
        # The record and its Pending and Running events in one transaction: one write,
        # and listeners see the events in order.
        assert self.events is not None
        pending = await self.events.operation_event(
            {**operation, "status": "Pending", "status_code": 105}, project=project
        )
        running = await self.events.operation_event(operation, project=project)
        written = dump(record)
        revision = await self.store.transaction(
            [Create(operation_key(op_id), written), pending, running]
        )
        context = OperationContext(self, op_id, project)
        context.done_if_created, context.created_revision = done_if_created, revision
        local = _Local(context=context, websocket=websocket, last=(written, revision))
        self._local[op_id] = local
        if run is not None:
            local.task = asyncio.create_task(self._run(context, run), name=f"operation-{op_id}")
        return operation

    async def _run(self, context: OperationContext, run: Task) -> None:
        status, err, extra = "Success", "", None
        try:
            extra = await run(context)
            if context.closed:  # the service that did the work wrote the end too
                self._ended_elsewhere(context.id)
                return
        except asyncio.CancelledError:
            if not context.cancelling:
                raise  # shutting down: close() reports it
            status = "Cancelled"
        except CroftError as exc:
            status, err = "Failure", exc.message
            # The service died or timed out after its change may have gone in (its reply
            # was lost): report what the store holds, as the reaper does for a dead owner.
            if isinstance(exc, Unavailable | Timeout) and await self._work_was_done(
                {"done_if_created": context.done_if_created}, context.created_revision
            ):
                log.info("operation %s: the reply was lost, the work was done", context.id)
                status, err = "Success", ""
        except Exception as exc:
            log.exception("operation %s failed", context.id)
            status, err = "Failure", f"{type(exc).__name__}: {exc}"
        await self._finish_quietly(context.id, status, err, extra, also=context.final_writes)

    async def finish(
        self,
        op_id: str,
        status: str = "Success",
        err: str = "",
        extra: dict[str, Any] | None = None,
    ) -> None:
        """End a task-less (websocket/token) operation of this process."""
        await self._finish_quietly(op_id, status, err, extra)

    async def _finish_quietly(
        self,
        op_id: str,
        status: str,
        err: str,
        extra: dict[str, Any] | None = None,
        also: Sequence[Operation] = (),
        attempts: int = _END_ATTEMPTS,
    ) -> None:
        """Record an operation's end, whatever else fails: writes that go with it and fail
        are dropped (`_change`), a store that does not answer is asked again for a while
        (an owner whose lease lapses meanwhile has its operations failed by a reaper)."""
        try:
            for attempt in range(attempts):
                try:
                    await self._end(op_id, _ending(status, err, extra), also)
                    return
                except _Gone:
                    return  # deleted (reaped and expired): nothing left to end
                except CroftError as exc:
                    log.warning("could not record the end of operation %s: %s", op_id, exc)
                    if attempt + 1 < attempts:
                        await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
            log.error("gave up recording the end of operation %s", op_id)
        finally:
            self._local.pop(op_id, None)

    async def _end(
        self,
        op_id: str,
        change: Callable[[dict[str, Any]], None],
        also: Sequence[Operation] = (),
    ) -> None:
        """Write an operation's final state, under a lease that makes the store delete it
        `keep_finished` seconds later (to a second more); without one (the store would
        not grant it), a task here deletes it."""
        keep = self.keep_finished
        try:
            lease = await self._finished_lease()
        except CroftError:
            lease = None
        try:
            await self._change(
                op_id, change, expires_in=keep, lease=lease.id if lease else 0, also=also
            )
        except _Gone:
            raise
        except CroftError as exc:
            if lease is None:
                raise
            # The record is as we left it and the writes riding along were dropped: what
            # failed is the lease (revoked meanwhile). The end goes without one.
            log.warning("operation %s ends without its lease: %s", op_id, exc)
            lease = None
            await self._change(op_id, change, expires_in=keep)
        if lease is None:
            expiry = asyncio.create_task(self._expire(op_id, keep))
            self._expiries.add(expiry)
            expiry.add_done_callback(self._expiries.discard)

    async def _closing(self, context: OperationContext) -> list[Operation]:
        """`OperationContext.closing_writes`: what `_end` would write for Success, from
        the record as this process last wrote it (the update fails its revision check if
        anyone wrote it since). Its lease and expiry are `keep_finished` + `ride_span` from
        now: a finished operation stays readable for `keep_finished` at least if the
        service commits its end within `ride_span`, and `ride_span` longer at most."""
        local = self._local.get(context.id)
        if local is None or local.last is None:
            return []
        try:
            lease = await self._end_lease(math.ceil(self.keep_finished + self.ride_span) + 1)
        except CroftError:
            return []
        value, revision = local.last
        record = json.loads(value)
        operation = record["operation"]
        if operation["status"] in FINAL:
            return []
        _ending("Success", "", None)(operation)
        operation["updated_at"] = rfc3339_nano()
        record["expires_at"] = time.time() + self.keep_finished + self.ride_span
        assert self.events is not None
        event = await self.events.operation_event(operation, project=record["project"])
        update = Update(operation_key(context.id), dump(record), revision, lease=lease.id)
        return [*context.final_writes, update, event]

    def _ended_elsewhere(self, op_id: str) -> None:
        """The end of an operation of ours was written with another service's change,
        under a lease that deletes it in time (`_closing`)."""
        self._local.pop(op_id, None)

    async def _finished_lease(self) -> Lease:
        """The lease finished operations are written under."""
        return await self._end_lease(max(2, math.ceil(self.keep_finished) + 1))

    async def _end_lease(self, ttl: int) -> Lease:
        """A lease of `ttl` seconds, replaced every second, so that one grant serves every
        operation ending in that second."""
        now = time.monotonic()
        held = self._end_leases.get(ttl)
        if held is None or now - held[1] >= 1.0:
            held = self._end_leases[ttl] = (await self.store.grant_lease(ttl), now)
        return held[0]

    async def _expire(self, op_id: str, after: float) -> None:
        await asyncio.sleep(after)
        with contextlib.suppress(NotFound, CroftError):
            entry = await self.store.get(operation_key(op_id))
            if entry is not None and entry.json()["operation"]["status"] in FINAL:
                await self.store.delete(operation_key(op_id), revision=entry.revision)

    # -- the record ---------------------------------------------------------------------

    async def _change(
        self,
        op_id: str,
        change: Callable[[dict[str, Any]], None],
        *,
        expires_in: float | None = None,
        record_change: Callable[[dict[str, Any]], None] | None = None,
        lease: int = 0,
        also: Sequence[Operation] = (),
    ) -> dict[str, Any] | None:
        """Read-modify-write of an operation record (compare-and-swap, retried). An owner's
        update never overwrites a final status set by someone else (a reaper that
        thought us dead). Publishes the new state; returns it, or None if nothing changed."""
        key = operation_key(op_id)
        local = self._local.get(op_id)
        failed: tuple[int, CroftError] | None = None  # the revision a write failed on, why
        with_event = True
        for _ in range(50):
            if local is not None and local.last is not None:
                value, revision = local.last
                local.last = None  # used once; a conflict below makes us read the store
            else:
                entry = await self.store.get(key)
                if entry is None:
                    raise _Gone("Operation not found")
                value, revision = entry.value, entry.revision
            if failed is not None and failed[0] == revision:
                # Nobody wrote the record since the transaction failed: what failed is a
                # write riding along (an event under a lease that expired, a rider whose
                # record moved on). The change goes alone: an operation must not stay
                # Running because something written with its end could not be.
                if also:
                    log.warning("operation %s: dropping %d writes that failed with its change: %s",
                                op_id, len(also), failed[1])  # fmt: skip
                    also = ()
                elif with_event:
                    with_event = False  # the event log refuses it: published after, if it can
                else:
                    raise failed[1]
            failed = None
            record = json.loads(value)
            operation: dict[str, Any] = record["operation"]
            if operation["status"] in FINAL:
                return None
            before = dump(record)
            change(operation)
            if record_change is not None:
                record_change(record)
            if dump(record) == before:
                return None
            operation["updated_at"] = rfc3339_nano()
            if expires_in is not None and operation["status"] in FINAL:
                record["expires_at"] = time.time() + expires_in
            assert self.events is not None
            events = (
                [await self.events.operation_event(operation, project=record["project"])]
                if with_event
                else []
            )
            written = dump(record)
            try:
                # The change and its event in one transaction.
                new_revision = await self.store.transaction(
                    [*also, Update(key, written, revision, lease=lease), *events]
                )
            except (Conflict, NotFound, InvalidArgument) as exc:
                # Ours may have moved on (read it again), or be gone, or a write riding
                # along failed: the read at the top tells which.
                failed = (revision, exc)
                continue
            if local is not None:
                local.last = (written, new_revision)
            if not with_event:
                await self._publish(operation, record["project"])
            return operation
        raise Conflict(f"operation {op_id} is changing too fast to be updated")

    async def _publish(self, operation: dict[str, Any], project: str) -> None:
        assert self.events is not None
        try:
            await self.events.publish("operation", operation, project=project)
        except CroftError as exc:
            log.warning("could not publish an event for operation %s: %s", operation["id"], exc)

    # -- reading ------------------------------------------------------------------------

    async def get(self, op_id: str) -> dict[str, Any]:
        """The stored record (operation, project, owner...); NotFound as LXD says it. An
        unfinished operation of this process is answered from its last write (this
        process is its only writer but for cancel requests, which `cancel` reads anew)."""
        local = self._local.get(op_id)
        if local is not None and local.last is not None:
            mine: dict[str, Any] = json.loads(local.last[0])
            return mine
        found = await self.store.get_json(operation_key(op_id))
        if found is None:
            raise NotFound("Operation not found")
        record: dict[str, Any] = found[0]
        return record

    async def list(self, project: str | None = None) -> list[dict[str, Any]]:
        """Records of every operation (of `project`, or of all projects for None)."""
        records = [entry.json() for entry in await self.store.list(OPERATIONS_PREFIX)]
        if project is not None:
            records = [r for r in records if r["project"] == project]
        records.sort(key=lambda r: r["operation"]["created_at"])
        return records

    async def wait(self, op_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The operation once it is final, or as it is when `timeout` seconds passed
        (None: no limit). Follows the record in the store: works for any owner."""
        key = operation_key(op_id)
        entry = await self.store.get(key)
        if entry is None:
            raise NotFound("Operation not found")
        latest: dict[str, Any] = entry.json()["operation"]
        if latest["status"] in FINAL or timeout == 0:
            return latest
        since = entry.revision
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async with _closing(self.store.watch(key, start_revision=since)) as events:
                            async for event in events:
                                if event.key != key:
                                    continue
                                since = event.revision
                                if event.type is EventType.DELETE:
                                    return latest
                                latest = _loads(event.value)["operation"]
                                if latest["status"] in FINAL:
                                    return latest
                    except Compacted:
                        # The record was last written before the oldest change the store
                        # still keeps: its state now, then what changes from now on.
                        since = await self.store.revision()
                        entry = await self.store.get(key)
                        if entry is None:
                            return latest  # ended and gone meanwhile
                        latest = entry.json()["operation"]
                        if latest["status"] in FINAL:
                            return latest
        except TimeoutError:
            pass
        return latest

    # -- cancelling ---------------------------------------------------------------------

    async def cancel(self, op_id: str, wait: float = 30.0) -> dict[str, Any]:
        """Cancel a running operation that may be cancelled, wherever it runs."""
        record = await self.get(op_id)
        operation = record["operation"]
        if operation["status"] in FINAL:
            raise InvalidArgument("Only running operations can be cancelled")
        if not operation["may_cancel"]:
            raise InvalidArgument("This operation can't be cancelled")
        local = self._local.get(op_id)
        if local is not None and local.task is not None:
            await self._cancel_local(op_id)
        elif not record["runs_task"]:
            # Nothing runs for it anywhere: any replica may end it.
            def cancelled(op: dict[str, Any]) -> None:
                op["status"], op["status_code"] = "Cancelled", STATUS_CODES["Cancelled"]

            try:
                await self._end(op_id, cancelled)
            finally:
                self._local.pop(op_id, None)
        else:

            def request(record: dict[str, Any]) -> None:
                record["cancel_requested"] = True

            await self._change(op_id, lambda op: None, record_change=request)
        return await self.wait(op_id, timeout=wait)

    async def _cancel_local(self, op_id: str) -> None:
        local = self._local.get(op_id)
        if local is None or local.task is None or local.context.cancelling:
            return
        local.context.cancelling = True

        def cancelling(op: dict[str, Any]) -> None:
            op["status"], op["status_code"] = "Cancelling", STATUS_CODES["Cancelling"]

        with contextlib.suppress(CroftError):
            await self._change(op_id, cancelling)
        local.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await local.task

    async def _cancel_requests_loop(self) -> None:
        """Cancel our tasks that another replica was asked to cancel."""
        while True:
            try:
                revision = await self.store.revision()
                async with _closing(
                    self.store.watch(OPERATIONS_PREFIX, start_revision=revision)
                ) as events:
                    async for event in events:
                        if event.type is not EventType.PUT:
                            continue
                        op_id = event.key[len(OPERATIONS_PREFIX) :]
                        if op_id not in self._local:
                            continue
                        record = _loads(event.value)
                        if record.get("cancel_requested") and record["owner"] == self.owner_id:
                            asyncio.create_task(self._cancel_local(op_id))
            except CroftError as exc:
                log.warning("operations watch broke (%s); resuming", exc)
                await asyncio.sleep(0.5)

    # -- websockets ---------------------------------------------------------------------

    def websocket(self, op_id: str) -> tuple[WebsocketHandler, OperationContext] | None:
        """The websocket hook of an operation of this process, if it has one."""
        local = self._local.get(op_id)
        if local is None or local.websocket is None:
            return None
        return local.websocket, local.context

    # -- reaping ------------------------------------------------------------------------

    async def reap(self) -> int:
        """One pass: fail the unfinished operations of dead owners, delete finished
        operations past their time. Returns how many records it changed."""
        changed = 0
        # Operations first, owners second: an operation seen here had its owner's key
        # written before it, so an owner missing from the later listing is really gone.
        entries = await self.store.list(OPERATIONS_PREFIX)
        owners = {e.key[len(OWNERS_PREFIX) :] for e in await self.store.list(OWNERS_PREFIX)}
        now = time.time()
        for entry in entries:
            record = entry.json()
            operation = record["operation"]
            if operation["status"] in FINAL:
                expires_at = record.get("expires_at")
                if expires_at is not None and now >= expires_at:
                    with contextlib.suppress(NotFound, Conflict):
                        await self.store.delete(entry.key, revision=entry.revision)
                        changed += 1
                continue
            if record["owner"] in owners or record["owner"] == self.owner_id:
                continue
            if not record.get("runs_task", True):
                continue  # a token: nothing was running, nothing was lost
            if await self._work_was_done(record, entry.create_revision):
                operation["status"], operation["status_code"] = "Success", STATUS_CODES["Success"]
                operation["err"] = ""
            else:
                operation["status"], operation["status_code"] = "Failure", STATUS_CODES["Failure"]
                operation["err"] = ORPHANED
            operation["updated_at"] = rfc3339_nano()
            record["expires_at"] = now + self.keep_orphaned
            try:
                await self.store.update(entry.key, dump(record), revision=entry.revision)
            except (Conflict, NotFound):
                continue  # another replica got there first, or it moved on
            log.warning(
                "operation %s (%s) of dead owner %s marked %s",
                operation["id"],
                operation["description"],
                record["owner"],
                "done" if operation["status"] == "Success" else "failed",
            )
            await self._publish(operation, record["project"])
            changed += 1
        return changed

    async def _work_was_done(self, record: dict[str, Any], created_at_revision: int) -> bool:
        """Whether an orphaned operation's `done_if_created` record says its work was done."""
        key = record.get("done_if_created")
        if not key:
            return False
        made = await self.store.get(key)
        if made is None or made.create_revision <= created_at_revision:
            return False  # never made, undone, or there before this operation
        # Only instance creates name a record to look for (`done_if_created`).
        return not InstanceRecord.meta_of(made.json()).creating

    async def _reap_loop(self) -> None:
        interval = self.reap_interval or max(self.lease_ttl / 2, 0.5)
        while True:
            try:
                await self.reap()
            except CroftError as exc:
                log.warning("operation reaper pass failed: %s", exc)
            await asyncio.sleep(interval)


class _Gone(NotFound):
    """The operation record is not in the store (any more)."""


def _ending(
    status: str, err: str, extra: dict[str, Any] | None
) -> Callable[[dict[str, Any]], None]:
    """The change of an operation object that ends it."""

    def change(op: dict[str, Any]) -> None:
        op["status"] = status
        op["status_code"] = STATUS_CODES[status]
        op["err"] = err
        if extra:
            op["metadata"] = {**(op.get("metadata") or {}), **extra}

    return change


def _loads(value: bytes) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(value)
    return record


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[Any]) -> AsyncIterator[AsyncIterator[Any]]:
    """Close a store watch when the caller stops following it (break, timeout, cancel)."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
