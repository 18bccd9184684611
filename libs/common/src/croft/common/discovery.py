"""Service discovery over the store.

Each service process registers `/croft/registry/<service>/<member>/<instance_id>` with its
address under a lease that a background task keeps alive; when the process dies the
lease expires and the entry disappears on its own. Callers resolve live instances, or
keep a `Watcher` that follows the registry so that picking an instance costs no
round trip to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from croft.common.errors import CroftError, NotFound
from croft.common.store import EventType, Lease, Store, dump
from croft.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

PREFIX = "/croft/registry/"


@dataclass(frozen=True)
class Instance:
    """One live process of a service, as it registered itself."""

    service: str
    member: str
    id: str
    address: str
    pid: int = 0
    started_at: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.service}/{self.member}/{self.id}"

    @classmethod
    def from_json(cls, value: bytes) -> Instance:
        data: dict[str, Any] = json.loads(value)
        return cls(**data)


def new_instance_id() -> str:
    return uuid.uuid4().hex[:12]


class Registration:
    """A registered instance and the task keeping its lease alive."""

    def __init__(self, store: Store, instance: Instance, ttl: int) -> None:
        self.store = store
        self.instance = instance
        self.ttl = ttl
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._write()
        self._task = asyncio.create_task(self._keep_alive(), name="registry-keepalive")

    async def _write(self) -> None:
        self._lease = await self.store.grant_lease(self.ttl)
        await self.store.put(self.instance.key, dump(asdict(self.instance)), lease=self._lease.id)

    async def _keep_alive(self) -> None:
        # Refresh at a third of the TTL so that one missed refresh does not expire us.
        interval = max(self.ttl / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                assert self._lease is not None
                await self.store.keep_alive(self._lease)
            except NotFound:
                # The lease expired (the store was unreachable for a while): register again.
                log.warning("registration lease expired; registering %s again", self.instance.key)
                with contextlib.suppress(CroftError):
                    await self._write()
            except CroftError as exc:
                log.warning("registry keep-alive failed: %s", exc)

    async def deregister(self) -> None:
        """Stop refreshing and remove the entry now (not at lease expiry)."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._lease is not None:
            with contextlib.suppress(CroftError):
                await self.store.revoke_lease(self._lease)
            self._lease = None


async def register(
    store: Store,
    service: str,
    member: str,
    address: str,
    metadata: dict[str, str] | None = None,
    *,
    ttl: int = 10,
    instance_id: str | None = None,
) -> Registration:
    """Register this process as an instance of `service`; deregister() on the way out."""
    instance = Instance(
        service=service,
        member=member,
        id=instance_id or new_instance_id(),
        address=address,
        pid=os.getpid(),
        started_at=time.time(),
        metadata=dict(metadata or {}),
    )
    registration = Registration(store, instance, ttl)
    await registration.start()
    return registration


def _prefix(service: str | None, member: str | None = None) -> str:
    if service is None:
        return PREFIX
    return f"{PREFIX}{service}/" + (f"{member}/" if member else "")


async def resolve(store: Store, service: str | None, member: str | None = None) -> list[Instance]:
    """The live instances of `service` (every service when None), optionally on one member."""
    found = [Instance.from_json(e.value) for e in await store.list(_prefix(service, member))]
    # Keys hold the member under each service: with every service, it is filtered here.
    return (
        found if member is None or service is not None else [i for i in found if i.member == member]
    )


async def watch(store: Store, service: str | None) -> AsyncIterator[list[Instance]]:
    """The full list of live instances, again after every change."""
    # The revision first: a registration landing between the two reads is then replayed by
    # the watch (a harmless repeat) instead of falling between them and being lost.
    revision = await store.revision()
    instances = {i.key: i for i in await resolve(store, service)}
    yield list(instances.values())
    async for event in store.watch(_prefix(service), start_revision=revision):
        if event.type is EventType.PUT:
            instances[event.key] = Instance.from_json(event.value)
        else:
            instances.pop(event.key, None)
        yield list(instances.values())


class Watcher:
    """Keeps the current instances of one service in memory, following the registry."""

    def __init__(self, store: Store, service: str) -> None:
        self.store = store
        self.service = service
        self.instances: list[Instance] = []
        self._ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"watch-{self.service}")
        await self._ready.wait()

    async def _follow(self) -> None:
        while True:
            try:
                async for instances in watch(self.store, self.service):
                    self.instances = instances
                    self._ready.set()
                    async with self._changed:
                        self._changed.notify_all()
            except CroftError as exc:
                log.warning("registry watch for %s broke (%s); resuming", self.service, exc)
                await asyncio.sleep(0.5)

    async def wait_for(self, predicate: Any, timeout: float) -> list[Instance]:
        """Wait until `predicate(instances)` holds; returns the instances."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: predicate(self.instances)), timeout
            )
        return self.instances

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
