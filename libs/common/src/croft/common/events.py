"""The cluster's event log: every service publishes LXD events here, every api replica
streams them to `/1.0/events` clients.

An event is LXD's event object (`type` operation|lifecycle|logging, `timestamp` in
RFC3339 with nanoseconds, `metadata`, `location`, `project`) stored as JSON under
`/croft/events/<nanoseconds>-<random>` with a short lease, so the log cleans itself up:
readers follow it with a store watch, never by listing it.

One lease serves every event a process writes for a while; it is replaced (not kept
alive) every `ttl / 2` seconds, so an event lives between `ttl / 2` and `ttl` seconds
and a publisher needs no background task.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from croft.common.store import Lease, Put, Store

EVENTS_PREFIX = "/croft/events/"
EVENT_TYPES: tuple[str, ...] = ("logging", "operation", "lifecycle")
EventKind = Literal["logging", "operation", "lifecycle"]

DEFAULT_TTL = 30


def rfc3339_nano(ns: int | None = None) -> str:
    """A UTC time the way Go's time.RFC3339Nano prints it (trailing zeros of the
    fraction dropped), which is what LXD puts in `timestamp`, `created_at`..."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{fraction:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


@dataclass(frozen=True)
class Event:
    type: str
    timestamp: str
    metadata: Any
    location: str = "none"
    project: str = "default"

    def to_lxd(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "timestamp": self.timestamp,
            "metadata": self.metadata,
            "location": self.location,
            "project": self.project,
        }

    @classmethod
    def from_lxd(cls, record: dict[str, Any]) -> Event:
        return cls(
            type=record["type"],
            timestamp=record["timestamp"],
            metadata=record.get("metadata"),
            location=record.get("location", "none"),
            project=record.get("project", "default"),
        )


def lifecycle_metadata(
    action: str,
    source: str,
    context: dict[str, Any] | None = None,
    requestor: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The metadata of a lifecycle event, e.g. `("profile-created", "/1.0/profiles/p")`.
    LXD omits `context` and `requestor` when it has none."""
    metadata: dict[str, Any] = {"action": action, "source": source}
    if context:
        metadata["context"] = context
    if requestor:
        metadata["requestor"] = requestor
    return metadata


class EventPublisher:
    """Writes events of one process under a shared, periodically replaced lease."""

    def __init__(self, store: Store, *, ttl: int = DEFAULT_TTL, location: str = "none") -> None:
        self.store = store
        self.ttl = ttl
        self.location = location
        self._lease: Lease | None = None
        self._lease_granted_at = 0.0
        self._lock = asyncio.Lock()

    async def _current_lease(self) -> Lease:
        async with self._lock:
            now = time.monotonic()
            if self._lease is None or now - self._lease_granted_at >= self.ttl / 2:
                # The old lease is left to expire on its own: its events stay readable
                # for the rest of their life.
                self._lease = await self.store.grant_lease(self.ttl)
                self._lease_granted_at = now
            return self._lease

    async def publish(
        self,
        type: EventKind,
        metadata: Any,
        *,
        project: str = "default",
        location: str | None = None,
    ) -> Event:
        event, put = await self._write(type, metadata, project, location)
        await self.store.put(put.key, put.value, lease=put.lease)
        return event

    async def event(
        self,
        type: EventKind,
        metadata: Any,
        *,
        project: str = "default",
        location: str | None = None,
    ) -> Put:
        """The write of an event, to put in the same store transaction as the change it
        reports: one write instead of two, and listeners never see the event before the
        change is stored."""
        return (await self._write(type, metadata, project, location))[1]

    async def _write(
        self, type: EventKind, metadata: Any, project: str, location: str | None
    ) -> tuple[Event, Put]:
        if type not in EVENT_TYPES:
            raise ValueError(f"{type!r} is not an LXD event type ({', '.join(EVENT_TYPES)})")
        ns = time.time_ns()
        where = self.location if location is None else location
        event = Event(type, rfc3339_nano(ns), metadata, where, project)
        key = f"{EVENTS_PREFIX}{ns:020d}-{secrets.token_hex(4)}"
        lease = await self._current_lease()
        # Field order as LXD sends it: listeners get these bytes verbatim.
        value = json.dumps(event.to_lxd(), separators=(",", ":")).encode()
        return event, Put(key, value, lease=lease.id)

    async def operation_event(self, operation: dict[str, Any], *, project: str) -> Put:
        """The write of an `operation` event, to go in the transaction of the operation
        record's change: never out of order with it."""
        return await self.event("operation", operation, project=project)


_publishers: weakref.WeakKeyDictionary[Store, EventPublisher] = weakref.WeakKeyDictionary()


def publisher(store: Store) -> EventPublisher:
    """The process-wide publisher for `store` (one lease per process and store)."""
    found = _publishers.get(store)
    if found is None:
        found = _publishers[store] = EventPublisher(store)
    return found


async def publish(
    store: Store,
    type: EventKind,
    metadata: Any,
    project: str = "default",
    location: str = "none",
) -> Event:
    """Publish one LXD event (`type` operation|lifecycle|logging) to every `/1.0/events`
    listener of every api replica."""
    return await publisher(store).publish(type, metadata, project=project, location=location)
