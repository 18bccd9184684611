"""`/1.0/events`: one store watch per api replica on the event log, fanned out to every
websocket listener of that replica, each filtered by event type and project."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from croft.api.wsframes import FrameWriter, text_frame
from croft.common.errors import CroftError
from croft.common.events import EVENTS_PREFIX
from croft.common.store import Compacted, EventType, Store
from croft.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

FLUSH_DELAY = 0.02  # seconds an event may wait for others to share its write (_dispatch)
QUEUE_LIMIT = 1024  # events buffered for one slow listener before it is dropped
WRITE_LIMIT = 1024 * 1024  # the same, in bytes, for a listener written to directly


def _urgent(event: dict[str, Any]) -> bool:
    """Whether an event is the end of an operation (Success, Failure, Cancelled)."""
    if event.get("type") != "operation":
        return False
    metadata = event.get("metadata")
    code = metadata.get("status_code", 0) if isinstance(metadata, dict) else 0
    return isinstance(code, int) and code >= 200


@dataclass(eq=False)
class Subscription:
    types: frozenset[str]
    project: str | None  # None: every project
    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_LIMIT)
    )
    # Set once the listener's connection takes frames directly (`EventHub.write_directly`):
    # events then skip the queue, which only carries the None that ends the listener.
    writer: FrameWriter | None = None
    # For a listener held to grants (croft.api.authz): whether it may see an event.
    may_see: Callable[[dict[str, Any]], bool] | None = None

    def wants(self, event: dict[str, Any]) -> bool:
        if event.get("type") not in self.types:
            return False
        if self.may_see is not None and not self.may_see(event):
            return False
        if self.project is None:
            return True
        # LXD sends project-less events (server-wide ones) to every project's listeners.
        return event.get("project", "") in ("", self.project)

    def wake(self) -> None:
        """Queue the None that ends the listener's sending loop, even when it is full."""
        with contextlib.suppress(asyncio.QueueEmpty):
            if self.queue.full():
                self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventHub:
    """Follows `/croft/events/` from the moment it starts and hands each event (as the
    JSON text LXD sends, newline-terminated) to the subscriptions that want it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._subscriptions: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Frames for the listeners written to directly, waiting to be sent (see _dispatch).
        self._unsent: dict[Subscription, list[bytes]] = {}
        self._flush_at: asyncio.Handle | None = None
        self._flush_soon = False  # _flush_at is a call_soon, not a timer

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="events-hub")
        await self._ready.wait()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self._flush()
        for subscription in self._subscriptions:
            subscription.wake()

    @property
    def listeners(self) -> int:
        """How many subscriptions are open (websocket clients of this replica)."""
        return len(self._subscriptions)

    def subscribe(
        self,
        types: Iterable[str],
        project: str | None,
        may_see: Callable[[dict[str, Any]], bool] | None = None,
    ) -> Subscription:
        subscription = Subscription(frozenset(types), project, may_see=may_see)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def write_directly(self, subscription: Subscription, writer: FrameWriter) -> None:
        """From now on, write the subscription's events as frames through `writer`. What
        is queued goes first, in the same turn of the event loop, so the order holds."""
        while not subscription.queue.empty():
            text = subscription.queue.get_nowait()
            if text is None:  # already ended
                subscription.queue.put_nowait(None)
                return
            if not writer(text_frame(text), WRITE_LIMIT):
                self._drop(subscription)
                return
        subscription.writer = writer

    def _drop(self, subscription: Subscription) -> None:
        log.warning(
            "an events listener fell %d events (or %d bytes) behind; dropping it",
            QUEUE_LIMIT,
            WRITE_LIMIT,
        )
        self._subscriptions.discard(subscription)
        subscription.wake()

    async def _follow(self) -> None:
        revision: int | None = None
        while True:
            try:
                if revision is None:
                    revision = await self.store.revision()
                watch = self.store.watch(EVENTS_PREFIX, start_revision=revision)
                self._ready.set()
                try:
                    async for change in watch:
                        revision = change.revision
                        if change.type is EventType.PUT:
                            self._dispatch(change.value)
                finally:
                    aclose = getattr(watch, "aclose", None)
                    if aclose is not None:
                        with contextlib.suppress(Exception):
                            await aclose()
            except Compacted as exc:
                log.warning("event log history compacted (%s); events in between are lost", exc)
                revision = exc.compact_revision - 1
            except CroftError as exc:
                # Resume from the last revision seen: no event is lost or repeated while
                # the store keeps its history.
                log.warning("event log watch broke (%s); resuming", exc)
                await asyncio.sleep(0.5)

    def _schedule_flush(self, urgent: bool) -> None:
        if self._flush_at is not None and (self._flush_soon or not urgent):
            return
        if self._flush_at is not None:
            self._flush_at.cancel()
        loop = asyncio.get_running_loop()
        if urgent:
            self._flush_at, self._flush_soon = loop.call_soon(self._flush), True
        else:
            self._flush_at, self._flush_soon = loop.call_later(FLUSH_DELAY, self._flush), False

    def _flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        unsent, self._unsent = self._unsent, {}
        for subscription, frames in unsent.items():
            if subscription.writer is None or subscription not in self._subscriptions:
                continue
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            if not subscription.writer(data, WRITE_LIMIT):
                self._drop(subscription)

    def _dispatch(self, value: bytes) -> None:
        """Hand an event to the listeners that want it.

        Listeners written to directly (every `lxc` client) get it in a write shared with
        the events around it: each write wakes the listener's process (~0.1 ms of its CPU
        here, more than reading the event), and each of ten `lxc` clients launching at
        once hears every event of all ten launches. The end of an operation, which clients
        wait for, is sent at once, with whatever came before it; other events (an
        operation's Pending and Running, lifecycle, logging) wait for it, or for
        `FLUSH_DELAY` at most. A launch's six writes to each listener become two."""
        try:
            event = json.loads(value)
        except json.JSONDecodeError:
            log.warning("ignoring a malformed event record")
            return
        text = value + b"\n"
        frame: bytes | None = None
        scheduled = False
        for subscription in list(self._subscriptions):
            if not subscription.wants(event):
                continue
            if subscription.writer is not None:
                if frame is None:
                    frame = text_frame(text)
                unsent = self._unsent.get(subscription)
                if unsent is None:
                    self._unsent[subscription] = [frame]
                else:
                    unsent.append(frame)
                if not scheduled:
                    self._schedule_flush(_urgent(event))
                    scheduled = True
                continue
            try:
                subscription.queue.put_nowait(text)
            except asyncio.QueueFull:
                self._drop(subscription)
