"""The etcd store against real etcd members: records, compare-and-swap, watches, leases,
transactions, and a cluster losing its leader."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import pytest

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, InvalidArgument, NotFound, Unavailable
from croft.common.store import (
    Compacted,
    Create,
    Delete,
    EventType,
    Put,
    Update,
    WatchEvent,
)
from croft.common.store.etcd import EtcdStore
from croft.common.testing.etcd import EtcdCluster, EtcdServer, compact, etcd_store

# Upper bounds that only keep a broken test from hanging; nothing here measures speed.
HANG_GUARD = 30


async def next_events(events, count: int) -> list[WatchEvent]:
    async with asyncio.timeout(HANG_GUARD):
        return [await anext(events) for _ in range(count)]


# -- records ---------------------------------------------------------------------------------


async def test_create_get_list_update_delete(store: EtcdStore, key_prefix: str) -> None:
    web = await store.create_json(
        f"{key_prefix}instances/web", {"name": "web", "status": "Stopped"}
    )
    db = await store.create_json(f"{key_prefix}instances/db", {"name": "db", "status": "Stopped"})
    await store.create_json(f"{key_prefix}networks/br0", {"name": "br0"})

    assert await store.get_json(f"{key_prefix}instances/web") == (
        {"name": "web", "status": "Stopped"},
        web.revision,
    )
    assert web.version == 1 and web.create_revision == web.revision
    listed = await store.list(f"{key_prefix}instances/")
    assert [e.key for e in listed] == [f"{key_prefix}instances/db", f"{key_prefix}instances/web"]
    assert [e.revision for e in listed] == [db.revision, web.revision]

    started = await store.update_json(
        f"{key_prefix}instances/web", {"name": "web", "status": "Running"}, revision=web.revision
    )
    assert started.revision > web.revision
    assert started.create_revision == web.revision and started.version == 2
    entry = await store.get(f"{key_prefix}instances/web")
    assert entry is not None and entry.json()["status"] == "Running"
    assert entry.revision == started.revision

    await store.delete(f"{key_prefix}instances/web", revision=started.revision)
    assert await store.get(f"{key_prefix}instances/web") is None
    assert [e.key for e in await store.list(f"{key_prefix}instances/")] == [
        f"{key_prefix}instances/db"
    ]
    assert await store.revision() > started.revision


async def test_update_with_a_stale_revision_is_a_conflict_naming_the_key(
    store: EtcdStore, key_prefix: str
) -> None:
    key = f"{key_prefix}x"
    first = await store.create(key, b"1")
    second = await store.update(key, b"2", revision=first.revision)

    with pytest.raises(Conflict) as caught:
        await store.update(key, b"3", revision=first.revision)
    assert str(caught.value) == (
        f"'{key}' changed since revision {first.revision} (now {second.revision})"
    )
    with pytest.raises(Conflict, match=f"'{key}' changed since revision {first.revision}"):
        await store.delete(key, revision=first.revision)
    entry = await store.get(key)
    assert entry is not None and entry.value == b"2" and entry.revision == second.revision


async def test_create_of_an_existing_key_is_a_conflict(store: EtcdStore, key_prefix: str) -> None:
    key = f"{key_prefix}name"
    first = await store.create(key, b"mine")
    with pytest.raises(Conflict, match=f"'{key}' already exists"):
        await store.create(key, b"theirs")
    entry = await store.get(key)
    assert entry is not None and entry.value == b"mine" and entry.revision == first.revision


async def test_missing_keys_are_not_found(store: EtcdStore, key_prefix: str) -> None:
    key = f"{key_prefix}gone"
    entry = await store.create(key, b"x")
    await store.delete(key)
    with pytest.raises(NotFound, match=f"'{key}' does not exist"):
        await store.update(key, b"y", revision=entry.revision)
    with pytest.raises(NotFound, match=f"'{key}' does not exist"):
        await store.delete(key, revision=entry.revision)
    with pytest.raises(NotFound, match=f"'{key}' does not exist"):
        await store.delete(key)
    assert await store.get(key) is None


async def test_put_overwrites_and_delete_prefix_counts(store: EtcdStore, key_prefix: str) -> None:
    first = await store.put(f"{key_prefix}a/1", b"one")
    second = await store.put(f"{key_prefix}a/1", b"uno")
    assert second.version == 2 and second.create_revision == first.revision
    await store.put(f"{key_prefix}a/2", b"two")
    await store.put(f"{key_prefix}ab", b"sibling")  # shares the string prefix "a", not "a/"

    assert await store.delete_prefix(f"{key_prefix}a/") == 2
    assert [e.key for e in await store.list(key_prefix)] == [f"{key_prefix}ab"]
    with pytest.raises(InvalidArgument):
        await store.delete_prefix("")


async def test_list_pages_through_many_keys(store: EtcdStore, key_prefix: str) -> None:
    await store.transaction([Put(f"{key_prefix}{i:05d}", b"v") for i in range(100)])
    await asyncio.gather(
        *(
            store.transaction([Put(f"{key_prefix}{i:05d}", b"v") for i in range(s, s + 100)])
            for s in range(100, 2500, 100)
        )
    )
    keys = [e.key for e in await store.list(key_prefix)]
    assert keys == [f"{key_prefix}{i:05d}" for i in range(2500)]


async def test_concurrent_writers_with_cas_retry_lose_no_update(
    store: EtcdStore, key_prefix: str
) -> None:
    key = f"{key_prefix}counter"
    await store.create_json(key, {"count": 0})
    conflicts = 0

    async def writer() -> None:
        nonlocal conflicts
        for _ in range(10):
            while True:
                found = await store.get_json(key)
                assert found is not None
                record, revision = found
                try:
                    await store.update_json(key, {"count": record["count"] + 1}, revision=revision)
                    break
                except Conflict:
                    conflicts += 1

    await asyncio.gather(*(writer() for _ in range(20)))
    found = await store.get_json(key)
    assert found is not None and found[0] == {"count": 200}
    print(f"200 increments by 20 writers took {conflicts} CAS retries")


# -- transactions ----------------------------------------------------------------------------


async def test_transaction_is_all_or_nothing_and_names_the_failing_key(
    store: EtcdStore, key_prefix: str
) -> None:
    a, b, d = f"{key_prefix}a", f"{key_prefix}b", f"{key_prefix}d"
    a1 = await store.create(a, b"a1")
    b1 = await store.create(b, b"b1")
    d1 = await store.create(d, b"d1")
    b2 = await store.update(b, b"b2", revision=b1.revision)  # someone else moved b on

    with pytest.raises(Conflict) as caught:
        await store.transaction(
            [
                Update(a, b"a2", revision=a1.revision),
                Update(b, b"b3", revision=b1.revision),
                Create(f"{key_prefix}c", b"c1"),
                Delete(d, revision=d1.revision),
                Put(f"{key_prefix}e", b"e1"),
            ]
        )
    assert str(caught.value) == f"'{b}' changed since revision {b1.revision} (now {b2.revision})"
    # Nothing of it happened.
    assert [(e.key, e.value) for e in await store.list(key_prefix)] == [
        (a, b"a1"),
        (b, b"b2"),
        (d, b"d1"),
    ]

    revision = await store.transaction(
        [
            Update(a, b"a2", revision=a1.revision),
            Update(b, b"b3", revision=b2.revision),
            Create(f"{key_prefix}c", b"c1"),
            Delete(d, revision=d1.revision),
            Put(f"{key_prefix}e", b"e1"),
            Delete(f"{key_prefix}absent"),  # no revision: absent is fine
        ]
    )
    entries = await store.list(key_prefix)
    assert [(e.key, e.value) for e in entries] == [
        (a, b"a2"),
        (b, b"b3"),
        (f"{key_prefix}c", b"c1"),
        (f"{key_prefix}e", b"e1"),
    ]
    assert {e.revision for e in entries} == {revision}


async def test_transaction_names_every_failed_condition(store: EtcdStore, key_prefix: str) -> None:
    taken = await store.create(f"{key_prefix}taken", b"x")
    with pytest.raises(Conflict) as caught:
        await store.transaction(
            [
                Create(f"{key_prefix}taken", b"y"),
                Update(f"{key_prefix}missing", b"y", revision=taken.revision),
            ]
        )
    message = str(caught.value)
    assert f"'{key_prefix}taken' already exists" in message
    assert f"'{key_prefix}missing' does not exist" in message


async def test_transaction_rejects_bad_input_and_changes_nothing(
    store: EtcdStore, key_prefix: str
) -> None:
    with pytest.raises(InvalidArgument, match="only once"):
        await store.transaction([Put(f"{key_prefix}k", b"1"), Delete(f"{key_prefix}k")])
    with pytest.raises(InvalidArgument, match="non-empty"):
        await store.transaction([Put(f"{key_prefix}k", b"1"), Put("", b"2")])
    assert await store.list(key_prefix) == []


# -- watch -----------------------------------------------------------------------------------


async def test_watch_delivers_every_change_in_order(store: EtcdStore, key_prefix: str) -> None:
    watched = f"{key_prefix}watched/"
    start = await store.revision()
    events = store.watch(watched, start_revision=start)
    try:
        a1 = await store.create(f"{watched}a", b"1")
        await store.put(f"{key_prefix}elsewhere", b"not watched")
        a2 = await store.update(f"{watched}a", b"2", revision=a1.revision)
        revision = await store.transaction(
            [Create(f"{watched}b", b"3"), Delete(f"{watched}a", revision=a2.revision)]
        )
        c = await store.put(f"{watched}c", b"4")

        assert await next_events(events, 5) == [
            WatchEvent(EventType.PUT, f"{watched}a", b"1", a1.revision),
            WatchEvent(EventType.PUT, f"{watched}a", b"2", a2.revision),
            WatchEvent(EventType.PUT, f"{watched}b", b"3", revision),
            WatchEvent(EventType.DELETE, f"{watched}a", b"", revision),
            WatchEvent(EventType.PUT, f"{watched}c", b"4", c.revision),
        ]
    finally:
        await events.aclose()


async def test_watch_from_a_past_revision_replays_what_came_after_it(
    store: EtcdStore, key_prefix: str
) -> None:
    written = [await store.put(f"{key_prefix}k{i}", str(i).encode()) for i in range(5)]
    events = store.watch(key_prefix, start_revision=written[1].revision)
    try:
        replayed = await next_events(events, 3)
        assert [(e.key, e.revision) for e in replayed] == [(w.key, w.revision) for w in written[2:]]
        later = await store.put(f"{key_prefix}k5", b"5")
        assert await next_events(events, 1) == [
            WatchEvent(EventType.PUT, later.key, b"5", later.revision)
        ]
    finally:
        await events.aclose()


def watchers(server: EtcdServer) -> float:
    with urllib.request.urlopen(f"{server.endpoint}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return float(line.split()[1])
    raise AssertionError("etcd reports no watcher count")


async def wait_for_watchers(server: EtcdServer, count: float) -> None:
    async with asyncio.timeout(HANG_GUARD):
        while True:  # etcd's metrics are the only outside view of its watchers: poll them
            if await in_thread(watchers, server) == count:
                return
            await asyncio.sleep(0.05)


async def test_leaving_a_watch_cancels_it_in_etcd(own_etcd_server: EtcdServer) -> None:
    async with etcd_store(own_etcd_server.endpoints) as store:
        assert watchers(own_etcd_server) == 0
        async with contextlib.aclosing(store.watch("/w/", start_revision=0)) as events:
            await store.put("/w/a", b"1")
            async for _ in events:
                await wait_for_watchers(own_etcd_server, 1)
                break
        await wait_for_watchers(own_etcd_server, 0)


async def test_watch_on_compacted_history_says_so(own_etcd_server: EtcdServer) -> None:
    async with etcd_store(own_etcd_server.endpoints) as store:
        for i in range(5):
            await store.put("/c/k", str(i).encode())
        now = await store.revision()
        compact(own_etcd_server.endpoint, now)
        with pytest.raises(Compacted, match=f"before revision {now} was compacted") as caught:
            await next_events(store.watch("/c/", start_revision=2), 1)
        assert caught.value.compact_revision == now


# -- leases ----------------------------------------------------------------------------------


async def test_expired_lease_removes_its_keys(store: EtcdStore, key_prefix: str) -> None:
    lease = await store.grant_lease(2)
    assert lease.ttl == 2
    await store.create(f"{key_prefix}member/1", b"10.0.0.1:8443", lease=lease.id)
    await store.put(f"{key_prefix}member/2", b"10.0.0.2:8443", lease=lease.id)
    entry = await store.get(f"{key_prefix}member/1")
    assert entry is not None and entry.lease == lease.id
    start = await store.revision()
    await store.keep_alive(lease)

    # No more keep-alives: wait for etcd to expire the lease and delete both keys.
    events = store.watch(f"{key_prefix}member/", start_revision=start)
    try:
        gone = await next_events(events, 2)
    finally:
        await events.aclose()
    assert {(e.type, e.key) for e in gone} == {
        (EventType.DELETE, f"{key_prefix}member/1"),
        (EventType.DELETE, f"{key_prefix}member/2"),
    }
    assert await store.list(f"{key_prefix}member/") == []
    with pytest.raises(NotFound, match="expired or was revoked"):
        await store.keep_alive(lease)
    with pytest.raises(NotFound):
        await store.create(f"{key_prefix}member/3", b"late", lease=lease.id)


async def test_revoked_lease_removes_its_keys_at_once(store: EtcdStore, key_prefix: str) -> None:
    lease = await store.grant_lease(60)
    await store.create(f"{key_prefix}lock", b"me", lease=lease.id)
    assert await store.lease_ttl(lease) > 0
    await store.revoke_lease(lease)
    assert await store.get(f"{key_prefix}lock") is None
    with pytest.raises(NotFound):
        await store.revoke_lease(lease)


# -- availability ----------------------------------------------------------------------------


async def test_no_answering_endpoint_is_unavailable_naming_them(
    own_etcd_server: EtcdServer,
) -> None:
    store = EtcdStore(own_etcd_server.endpoints, timeout=1.0)
    await store.start()
    try:
        await store.put("/k", b"v")
        own_etcd_server.kill()
        with pytest.raises(Unavailable) as caught:
            await store.get("/k")
        assert own_etcd_server.endpoint in str(caught.value)
        assert "within 1s" in str(caught.value)
    finally:
        await store.close()


async def test_cluster_serves_through_the_store_when_its_leader_is_killed(
    etcd_cluster: EtcdCluster,
) -> None:
    leader = etcd_cluster.leader()
    # The leader first, so that both the calls and the watch stream start on the victim.
    endpoints = [etcd_cluster.endpoints[leader]] + [
        e for i, e in enumerate(etcd_cluster.endpoints) if i != leader
    ]
    async with etcd_store(endpoints, timeout=10.0) as store:
        start = await store.revision()
        before = [await store.put(f"/fo/k{i}", f"{i}".encode()) for i in range(3)]
        events = store.watch("/fo/", start_revision=start)
        try:
            assert [(e.key, e.revision) for e in await next_events(events, 3)] == [
                (b.key, b.revision) for b in before
            ]

            etcd_cluster.kill(leader)

            after = [await store.put(f"/fo/k{i}", f"{i}".encode()) for i in range(3, 6)]
            created = await store.create("/fo/new", b"1")
            updated = await store.update("/fo/new", b"2", revision=created.revision)
            assert [e.key for e in await store.list("/fo/")] == [
                "/fo/k0", "/fo/k1", "/fo/k2", "/fo/k3", "/fo/k4", "/fo/k5", "/fo/new"
            ]  # fmt: skip
            entry = await store.get("/fo/new")
            assert entry is not None and entry.value == b"2"

            # The watch moved to a live member and resumed after the last event it gave.
            resumed = await next_events(events, 5)
            assert [(e.key, e.revision) for e in resumed] == [
                (a.key, a.revision) for a in after
            ] + [("/fo/new", created.revision), ("/fo/new", updated.revision)]
        finally:
            await events.aclose()
        assert etcd_cluster.leader() != leader
