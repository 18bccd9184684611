"""The mirrored store against a real etcd: reads under its prefixes come from memory, yet
never show less than this process has already seen of the store."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from croft.common import rpc
from croft.common.errors import Unavailable
from croft.common.store import Create, Delete, Update, observe, observed, observed_all
from croft.common.store.etcd import EtcdStore
from croft.common.store.mirror import MirroredStore
from croft.common.testing.etcd import EtcdServer, etcd_store
from croft.v1 import common_pb2, common_pb2_grpc

HANG_GUARD = 30  # only keeps a broken test from hanging


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG_GUARD):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


def ranges_served(server: EtcdServer) -> float:
    """How many Range calls etcd has answered: the outside view of who read it."""
    total = 0.0
    with urllib.request.urlopen(f"{server.endpoint}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("grpc_server_handled_total") and 'grpc_method="Range"' in line:
                total += float(line.split()[-1])
    return total


@contextlib.asynccontextmanager
async def mirrored(store: EtcdStore, prefix: str, **kwargs: float) -> AsyncIterator[MirroredStore]:
    mirror = MirroredStore(store, (prefix,), **kwargs)
    await mirror.start()
    assert mirror.following
    try:
        yield mirror
    finally:
        await mirror.close()


async def test_reads_under_the_prefix_do_not_reach_etcd(
    etcd_server: EtcdServer, store: EtcdStore, key_prefix: str
) -> None:
    written = await store.create_json(f"{key_prefix}profiles/default", {"name": "default"})
    outside = await store.create(f"{key_prefix.rstrip('/')}-other/x", b"x")
    async with mirrored(store, key_prefix) as mirror:
        before = ranges_served(etcd_server)
        for _ in range(20):
            assert await mirror.get(written.key) == written
            assert await mirror.get(f"{key_prefix}profiles/missing") is None
            assert [e.key for e in await mirror.list(key_prefix)] == [written.key]
        assert ranges_served(etcd_server) == before
        # Keys outside the prefixes are read from etcd, as before.
        assert (await mirror.get(outside.key)).value == b"x"  # type: ignore[union-attr]
        assert ranges_served(etcd_server) == before + 1


async def test_a_write_is_seen_by_the_next_read(store: EtcdStore, key_prefix: str) -> None:
    """Read-your-writes, every time: the write's answer carries its revision, and the
    mirrored read waits for the watch to bring it."""
    key = f"{key_prefix}instances/c1"
    async with mirrored(store, key_prefix) as mirror:
        for i in range(30):
            written = await store.put(key, str(i).encode())
            found = await mirror.get(key)
            assert found is not None and found.value == str(i).encode()
            assert found.revision == written.revision
            assert [e.value for e in await mirror.list(f"{key_prefix}instances/")] == [
                str(i).encode()
            ]
        await store.delete(key)
        assert await mirror.get(key) is None
        assert await mirror.list(f"{key_prefix}instances/") == []


async def test_entries_and_listings_match_the_store(store: EtcdStore, key_prefix: str) -> None:
    async with mirrored(store, key_prefix) as mirror:
        await store.transaction(
            [Create(f"{key_prefix}b/2", b"2"), Create(f"{key_prefix}a/1", b"1")]
        )
        await store.put(f"{key_prefix}c", b"3")
        first = await store.get(f"{key_prefix}a/1")
        assert first is not None
        await store.transaction(
            [
                Update(f"{key_prefix}a/1", b"1b", first.revision),
                Delete(f"{key_prefix}c"),
                Create(f"{key_prefix}a/0", b"0"),
            ]
        )
        for prefix in (key_prefix, f"{key_prefix}a/", f"{key_prefix}b/", f"{key_prefix}z"):
            assert await mirror.list(prefix) == await store.list(prefix)
        for key in (f"{key_prefix}a/1", f"{key_prefix}a/0", f"{key_prefix}c"):
            assert await mirror.get(key) == await store.get(key)


async def test_a_mirror_that_cannot_catch_up_reads_the_store(
    own_etcd_server: EtcdServer, key_prefix: str
) -> None:
    # A store of its own: what this test makes the process believe must not slow others.
    async with etcd_store(own_etcd_server.endpoints) as store:
        key = f"{key_prefix}server/config"
        await store.put(key, b"old")
        async with mirrored(store, key_prefix, max_wait=0.2) as mirror:
            # Pretend this process saw a revision the store has not reached: the copy
            # cannot prove it is current, so the read goes to etcd (and still answers).
            observe(store.cluster, observed(store.cluster) + 1000)
            before = ranges_served(own_etcd_server)
            async with asyncio.timeout(HANG_GUARD):
                found = await mirror.get(key)
            assert found is not None and found.value == b"old"
            assert ranges_served(own_etcd_server) == before + 1


async def test_a_mirror_resumes_after_losing_its_watch(
    own_etcd_server: EtcdServer, key_prefix: str
) -> None:
    async with etcd_store(own_etcd_server.endpoints, timeout=2.0) as store:
        key = f"{key_prefix}images/x"
        async with mirrored(store, key_prefix) as mirror:
            await store.put(key, b"1")
            own_etcd_server.kill()
            await until(lambda: not mirror.following)  # the watch gives up after 2 s
            # Meanwhile reads go to the store (which cannot answer either: Unavailable).
            own_etcd_server.restart()
            await store.put(key, b"2")
            await store.put(f"{key_prefix}images/y", b"3")
            await until(lambda: mirror.following)
            found = await mirror.get(key)
            assert found is not None and found.value == b"2"
            assert [e.value for e in await mirror.list(f"{key_prefix}images/")] == [b"2", b"3"]
            # It went on from where it was: no listing again (etcd's counters restarted
            # with it), and the reads above came from memory.
            assert ranges_served(own_etcd_server) == 0


def watchers(server: EtcdServer) -> float:
    """How many watchers etcd is serving."""
    with urllib.request.urlopen(f"{server.endpoint}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return float(line.split()[-1])
    raise AssertionError("etcd reports no watcher count")


async def next_changes(watch: Any, count: int) -> list[tuple[str, bytes]]:
    async with asyncio.timeout(HANG_GUARD):
        return [(change.key, change.value) for change in [await anext(watch) for _ in range(count)]]


async def test_watches_from_now_are_served_by_the_mirror(
    own_etcd_server: EtcdServer, key_prefix: str
) -> None:
    """The api follows events and operations besides the records: from the mirror's one
    etcd watch, not three."""
    async with (
        etcd_store(own_etcd_server.endpoints) as store,
        mirrored(store, f"{key_prefix}records/") as mirror,
    ):
        await until(lambda: watchers(own_etcd_server) == 1)  # the mirror's own
        etcd_watches = 1.0
        events = mirror.watch(f"{key_prefix}events/")
        operations = mirror.watch(f"{key_prefix}operations/", start_revision=await store.revision())
        assert watchers(own_etcd_server) == etcd_watches
        await store.transaction(
            [
                Create(f"{key_prefix}operations/1", b"created"),
                Create(f"{key_prefix}events/1", b"pending"),
                Create(f"{key_prefix}events/2", b"running"),
            ]
        )
        await store.put(f"{key_prefix}records/x", b"record")
        await store.put(f"{key_prefix}operations/1", b"done")
        assert await next_changes(events, 2) == [
            (f"{key_prefix}events/1", b"pending"),
            (f"{key_prefix}events/2", b"running"),
        ]
        assert await next_changes(operations, 2) == [
            (f"{key_prefix}operations/1", b"created"),
            (f"{key_prefix}operations/1", b"done"),
        ]
        await events.aclose()
        assert watchers(own_etcd_server) == etcd_watches
        # A watch that needs history the mirror has already passed goes to etcd.
        first = (await store.get(f"{key_prefix}operations/1")).revision - 1
        history = mirror.watch(f"{key_prefix}operations/", start_revision=first)
        assert await next_changes(history, 1) == [(f"{key_prefix}operations/1", b"done")]
        assert watchers(own_etcd_server) == etcd_watches + 1
        await history.aclose()
        # Closing the mirror ends what it serves with an error its readers resume from.
    with pytest.raises(Unavailable):
        async with asyncio.timeout(HANG_GUARD):
            await anext(operations)


SERVICE_PROCESS = """
import asyncio, sys
from croft.common import discovery
from croft.common.rpc import Server
from croft.common.store.etcd import EtcdStore

async def main(endpoint, key):
    store = EtcdStore([endpoint]); await store.start()
    server = Server("probe", "m1", "p1"); address = await server.start()
    await discovery.register(store, "probe", "m1", address, instance_id="p1")
    await asyncio.sleep(0.5)
    written = await store.put(key, b"written by the service")
    print(written.revision, flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_service_reply_carries_what_the_service_saw(
    etcd_server: EtcdServer, store: EtcdStore, key_prefix: str
) -> None:
    """What a service wrote before it replied is known to its caller afterwards, though
    the caller never read it: the reply carries the service's revisions. A mirrored read
    after the call then waits for that write."""
    await store.put(f"{key_prefix}start", b"")
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVICE_PROCESS, etcd_server.endpoint, f"{key_prefix}images/x",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    client = rpc.ServiceClient(store, "probe", common_pb2_grpc.ServiceStub)
    try:
        await client.start()
        assert service.stdout is not None
        async with asyncio.timeout(HANG_GUARD):
            written = int(await service.stdout.readline())
        await until(lambda: bool(client.instances()))
        assert observed(store.cluster) < written  # nothing here has seen the write
        await client.call("Status", common_pb2.StatusRequest())
        assert observed(store.cluster) >= written
    finally:
        await client.close()
        service.kill()
        await service.wait()


@pytest.mark.parametrize("bad", ["", "nonsense", "zz:1", "1:zz"])
def test_malformed_revision_metadata_is_ignored(bad: str) -> None:
    before = dict(observed_all())
    rpc._observe_revisions(((rpc._REVISIONS, bad),))
    assert observed_all() == before
