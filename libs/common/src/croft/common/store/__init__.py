"""The cluster store: every croft record lives here.

`Store` is the narrow interface every service uses; `croft.common.store.etcd.EtcdStore`
is the etcd v3 backend. It is kept narrow on purpose, so that another backend (Consul:
KV with CAS index, sessions for leases, blocking queries for watch) is one module.

Contract, for every backend:
- keys are `str` (UTF-8), values are `bytes`; `revision` of an entry is its last
  modification revision, cluster-wide and monotonically increasing.
- `create` fails with `Conflict` when the key exists; `update` and `delete` with a
  `revision` fail with `Conflict` when the key changed since that revision, `NotFound`
  when it is gone. A name is unique cluster-wide because `create` is atomic.
- `transaction` applies all of its operations or none; its `Conflict` names the key.
- `watch(prefix, start_revision)` yields every change under the prefix, in revision order,
  starting after `start_revision` (or from now), until the caller stops iterating. When the
  history after `start_revision` was compacted away it raises `Compacted`: re-list, then
  watch from the listing's revision.
- keys written with a lease disappear when the lease expires or is revoked.
- a backend with several endpoints fails over to another one when one dies; callers
  see `Unavailable` only when none answers.
"""

from __future__ import annotations

import abc
import builtins
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc

from croft.common.errors import CroftError
from croft.common.internal_tls import Identity


class Compacted(CroftError):
    """A watch asked for history the store no longer keeps (it was compacted)."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE
    http_status = 410

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    revision: int  # modification revision of this key
    create_revision: int
    version: int
    lease: int = 0

    def json(self) -> Any:
        return json.loads(self.value)


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    key: str
    value: bytes  # empty for DELETE
    revision: int
    # For a PUT, what `get` would now also say of the entry (0 where a backend cannot
    # say). Not part of an event's identity: that is the change, above.
    create_revision: int = field(default=0, compare=False)
    version: int = field(default=0, compare=False)
    lease: int = field(default=0, compare=False)

    def entry(self) -> Entry:
        return Entry(
            self.key, self.value, self.revision, self.create_revision, self.version, self.lease
        )


# Operations of a multi-key transaction.
@dataclass(frozen=True)
class Create:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Update:
    key: str
    value: bytes
    revision: int  # the entry's revision the caller read; Conflict if it changed
    lease: int = 0


@dataclass(frozen=True)
class Put:
    """Unconditional write."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    revision: int | None = None  # None: delete whatever is there (absent is fine)


Operation = Create | Update | Put | Delete


@dataclass
class Lease:
    id: int
    ttl: int


# The highest store revision this process has seen, per cluster (etcd's cluster id): in
# any answer of the store, and in the replies of other croft services (`croft.common.rpc`
# carries it). A read served from a copy (`croft.common.store.mirror`) waits for the copy
# to reach it, so that it never shows less than this process already knew.
_observed: dict[int, int] = {}


def observe(cluster: int, revision: int) -> None:
    if revision > _observed.get(cluster, 0):
        _observed[cluster] = revision


def observed(cluster: int) -> int:
    return _observed.get(cluster, 0)


def observed_all() -> dict[int, int]:
    return _observed


class Store(abc.ABC):
    # Which cluster the store is (etcd's cluster id), once it has answered; 0 before.
    cluster: int = 0
    # The member's certificate it reaches etcd with (croft.common.internal_tls), which its
    # users' gRPC channels present too; None without TLS (in-process tests).
    identity: Identity | None = None

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with `prefix`, sorted by key."""

    @abc.abstractmethod
    async def list_at(self, prefix: str, revision: int) -> builtins.list[Entry]:
        """`list` as the store was at `revision` (Compacted when that is forgotten)."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, *, lease: int = 0) -> Entry: ...

    @abc.abstractmethod
    async def update(self, key: str, value: bytes, *, revision: int, lease: int = 0) -> Entry: ...

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> Entry: ...

    @abc.abstractmethod
    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Delete `key`. NotFound if absent; Conflict if `revision` is given and differs."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many went."""

    @abc.abstractmethod
    async def transaction(self, operations: Sequence[Operation]) -> int:
        """Apply all operations atomically; returns the store revision after it."""

    @abc.abstractmethod
    def watch(self, prefix: str, *, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        """Changes under `prefix` after `start_revision` (exclusive), or from now."""

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store's current revision."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> Lease: ...

    @abc.abstractmethod
    async def keep_alive(self, lease: Lease) -> None:
        """Refresh a lease once. NotFound if it already expired."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: Lease) -> None:
        """Revoke a lease now; its keys go at once. NotFound if it already expired."""

    @abc.abstractmethod
    async def lease_ttl(self, lease: Lease) -> int:
        """Seconds `lease` has left. NotFound if it expired or was revoked."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # Conveniences on top of the primitives: JSON records.
    async def get_json(self, key: str) -> tuple[Any, int] | None:
        entry = await self.get(key)
        return None if entry is None else (entry.json(), entry.revision)

    async def create_json(self, key: str, record: Any, *, lease: int = 0) -> Entry:
        return await self.create(key, dump(record), lease=lease)

    async def update_json(self, key: str, record: Any, *, revision: int) -> Entry:
        return await self.update(key, dump(record), revision=revision)


def dump(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


async def connect(endpoints: Sequence[str], identity: Identity | None = None) -> Store:
    """The store for the configured endpoints (etcd: `https://host:port` URLs reached
    with the member's `identity`, or `http://` plain)."""
    from croft.common.store.etcd import EtcdStore

    store = EtcdStore(endpoints, identity=identity)
    await store.start()
    return store
