"""A store whose reads under some prefixes are answered from memory, kept by a watch.

The api reads the same few records again and again: the server config on every `lxc`
command, the default profile, image aliases and images on every launch, an instance on
every GET and state change. Each of those reads costs ~0.5 ms of CPU in the caller and as
much again in etcd. `MirroredStore` lists the prefixes once, follows every change with
one watch on the whole keyspace, and answers `get` and `list` under them from its copy.

Reads stay consistent with what this process has seen. Every store answer and every
reply of another croft service carries a store revision (`observe`); a mirrored read
first waits until the watch has delivered everything up to the highest one. A client
that saw a write through this process, or through a service call this process made,
then reads its result here, sees it. What it cannot know of are writes made elsewhere
and not yet seen here (another api replica's, a moment ago): such a read may be one
watch delivery behind, never older than a read from another member would be.

While the mirror is not following the store (before it starts, while the watch is
re-established), and when the watch lags more than `max_wait`, reads go to the store.
Writes and leases always go to the store.

Watches are served from the mirror's own watch when they start at or after what it has
applied (`watch` without a start revision, or from a revision just read): the api follows
the event log and the operations besides the records, and three etcd watches would each
be sent, and each decode, every change to the keys they share. A watch that needs older
history goes to the store. A tap keeps going while the mirror re-establishes its watch;
when the mirror has to reload (it fell behind compaction) or closes, its taps end with a
`Unavailable` error, from which their readers resume as they would from a lost store watch.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from croft.common.errors import CroftError, Unavailable
from croft.common.store import (
    Compacted,
    Entry,
    EventType,
    Lease,
    Operation,
    Store,
    WatchEvent,
    observed,
)
from croft.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class _Tap:
    """One watch served from the mirror's: changes under `prefix` after `after`, queued
    by the mirror as it applies them. Iterating it ends (`aclose`, or being dropped)
    stops the queueing."""

    def __init__(self, taps: set[_Tap], prefix: str, after: int) -> None:
        self.prefix = prefix
        self.after = after
        self.queue: asyncio.Queue[WatchEvent | CroftError] = asyncio.Queue()
        self._taps = taps
        taps.add(self)

    def __aiter__(self) -> _Tap:
        return self

    async def __anext__(self) -> WatchEvent:
        if self not in self._taps and self.queue.empty():
            raise StopAsyncIteration
        change = await self.queue.get()
        if isinstance(change, CroftError):
            self._taps.discard(self)
            raise change
        return change

    async def aclose(self) -> None:
        self._taps.discard(self)

    def __del__(self) -> None:
        self._taps.discard(self)


class MirroredStore(Store):
    """`inner`, with `get`/`list` of keys under `prefixes` answered from a watched copy."""

    def __init__(self, inner: Store, prefixes: Sequence[str], *, max_wait: float = 0.5) -> None:
        if not prefixes or any(not p for p in prefixes):
            raise ValueError("a mirror needs one or more non-empty prefixes")
        self.inner = inner
        self.identity = inner.identity
        self.prefixes = tuple(prefixes)
        self.max_wait = max_wait
        self._entries: dict[str, Entry] = {}
        self._keys: list[str] = []  # sorted; rebuilt lazily after a key comes or goes
        self._keys_stale = False
        self._revision = 0  # every change up to here is applied
        self._following = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._taps: set[_Tap] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout: float = 5.0) -> None:
        """Load the prefixes and start following; reads go to the store until then (or if
        that takes longer than `timeout`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="store-mirror")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()

    async def close(self) -> None:
        """Stop following; the inner store is the caller's to close."""
        await cancel_and_wait(self._task)
        self._task = None
        self._stop_following()
        self._break_taps("the store mirror closed")

    @property
    def following(self) -> bool:
        return self._following

    async def _follow(self) -> None:
        loaded = False
        while True:
            try:
                if not loaded:
                    await self._load()
                    loaded = True
                # After a lost watch, the copy is good up to its revision: go on from there.
                watch = self.inner.watch("", start_revision=self._revision)
                try:
                    self._following = True
                    self._ready.set()
                    self._advance(self._revision)
                    async for change in watch:
                        self._apply(change)
                finally:
                    self._stop_following()
                    # A Store's watch is an AsyncIterator: etcd's is a generator, to close.
                    aclose = getattr(watch, "aclose", None)
                    if aclose is not None:
                        with contextlib.suppress(Exception):
                            await aclose()
            except asyncio.CancelledError:
                raise
            except Compacted:
                log.info("store mirror fell behind compaction; loading it again")
                loaded = False
                self._break_taps("the store mirror fell behind compaction")
            except CroftError as exc:
                log.warning("store mirror lost its watch (%s); resuming", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("store mirror failed; reads go to the store until it reloads")
                loaded = False
                self._break_taps("the store mirror failed")
                await asyncio.sleep(0.5)

    async def _load(self) -> None:
        """Every entry under the prefixes, at one revision."""
        revision = await self.inner.revision()
        entries: dict[str, Entry] = {}
        for prefix in self.prefixes:
            for entry in await self.inner.list_at(prefix, revision):
                entries[entry.key] = entry
        self._entries = entries
        self._keys_stale = True
        self._revision = revision

    def _apply(self, change: WatchEvent) -> None:
        for tap in self._taps:
            if change.revision > tap.after and change.key.startswith(tap.prefix):
                tap.queue.put_nowait(change)
        if self._mirrors(change.key):
            if change.type is EventType.DELETE:
                if self._entries.pop(change.key, None) is not None:
                    self._keys_stale = True
            else:
                if change.key not in self._entries:
                    self._keys_stale = True
                self._entries[change.key] = change.entry()
        self._advance(change.revision)

    def _advance(self, revision: int) -> None:
        # A transaction's events share a revision and come in one batch, handed out
        # without a pause in between: no waiter runs before the last of them is applied.
        self._revision = max(self._revision, revision)
        if self._waiters and self._waiters[0][0] <= self._revision:
            waiting, self._waiters = self._waiters, []
            for target, future in waiting:
                if target <= self._revision:
                    if not future.done():
                        future.set_result(None)
                else:
                    self._waiters.append((target, future))

    def _stop_following(self) -> None:
        self._following = False
        waiting, self._waiters = self._waiters, []
        for _, future in waiting:
            if not future.done():
                future.set_result(None)  # they find the mirror not following: store reads

    async def _current(self) -> bool:
        """Whether the copy holds everything this process has seen (waiting a little for
        the watch when it does not yet); False means: read the store."""
        target = observed(self.inner.cluster)
        if not self._following:
            return False
        if self._revision >= target:
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._waiters.sort(key=lambda w: w[0])
        try:
            async with asyncio.timeout(self.max_wait):
                await future
        except TimeoutError:
            return False
        return self._following and self._revision >= target

    def _mirrors(self, prefix: str) -> bool:
        return prefix.startswith(self.prefixes)

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        if self._mirrors(key) and await self._current():
            return self._entries.get(key)
        return await self.inner.get(key)

    async def list(self, prefix: str) -> list[Entry]:
        if self._mirrors(prefix) and await self._current():
            if self._keys_stale:
                self._keys = sorted(self._entries)
                self._keys_stale = False
            keys = self._keys
            start = bisect.bisect_left(keys, prefix)
            found: list[Entry] = []
            for key in keys[start:]:
                if not key.startswith(prefix):
                    break
                found.append(self._entries[key])
            return found
        return await self.inner.list(prefix)

    async def list_at(self, prefix: str, revision: int) -> builtins.list[Entry]:
        return await self.inner.list_at(prefix, revision)

    async def revision(self) -> int:
        return await self.inner.revision()

    # -- everything else is the store's ---------------------------------------------------

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> Entry:
        return await self.inner.create(key, value, lease=lease)

    async def update(self, key: str, value: bytes, *, revision: int, lease: int = 0) -> Entry:
        return await self.inner.update(key, value, revision=revision, lease=lease)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> Entry:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        await self.inner.delete(key, revision=revision)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def transaction(self, operations: Sequence[Operation]) -> int:
        return await self.inner.transaction(operations)

    def watch(self, prefix: str, *, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        """Changes under `prefix` after `start_revision`, from the mirror's watch when it
        has not applied any of them yet (see the module's doc), else from the store."""
        if self._following and (start_revision is None or start_revision >= self._revision):
            return _Tap(
                self._taps, prefix, self._revision if start_revision is None else start_revision
            )
        return self.inner.watch(prefix, start_revision=start_revision)

    def _break_taps(self, why: str) -> None:
        taps = list(self._taps)
        self._taps.clear()
        for tap in taps:
            tap.queue.put_nowait(Unavailable(why))

    async def grant_lease(self, ttl: int) -> Lease:
        return await self.inner.grant_lease(ttl)

    async def keep_alive(self, lease: Lease) -> None:
        await self.inner.keep_alive(lease)

    async def revoke_lease(self, lease: Lease) -> None:
        await self.inner.revoke_lease(lease)

    async def lease_ttl(self, lease: Lease) -> int:
        return await self.inner.lease_ttl(lease)
