"""`/1.0/events` on any replica carries the events of the whole cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, unix_connect

from croft.api.events import FLUSH_DELAY
from croft.common.events import Event, lifecycle_metadata, rfc3339_nano
from croft.common.testing.waiting import wait_until

from .conftest import Replica
from .test_operations import held_operation, release

PUBLISH = """
import asyncio, sys
from croft.common import events
from croft.common.store import connect

async def main():
    store = await connect([sys.argv[1]])
    await events.publish(store, "lifecycle",
                         events.lifecycle_metadata("instance-started", "/1.0/instances/c1"),
                         project=sys.argv[2])
    await store.close()

asyncio.run(main())
"""


PUBLISH_BIG = """
import asyncio, sys
from croft.common import events
from croft.common.store import connect

async def main():
    store = await connect([sys.argv[1]])
    for i in range(int(sys.argv[2])):
        await events.publish(store, "logging", {"message": str(i) + " " + "x" * 65536})
    await store.close()

asyncio.run(main())
"""


def publish_from_another_process(endpoint: str, project: str = "default") -> None:
    subprocess.run([sys.executable, "-c", PUBLISH, endpoint, project], check=True, timeout=60)


# The `lxc` client does not offer permessage-deflate: the hub writes each event's frame to
# its connection itself. Python's websockets offers it: those events go through the
# listener's queue and the protocol. Both must deliver the same stream.
PATHS = {"direct": None, "deflate": "deflate"}


def listen(replica: Replica, query: str = "", path: str = "deflate") -> ClientConnection:
    return unix_connect(str(replica.socket), f"ws://lxd/1.0/events{query}", compression=PATHS[path])


def receive_until(ws: ClientConnection, predicate: Any, timeout: float = 30.0) -> list[dict]:
    """Events received until one satisfies `predicate` (all of them, in order)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=deadline - time.monotonic()))
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"no matching event among {seen}")


@pytest.mark.parametrize("path", PATHS)
def test_events_from_other_replicas_and_processes(
    replica: Replica, second_replica: Replica, clean_store: Any, path: str
) -> None:
    with listen(second_replica, "?type=operation,lifecycle", path) as ws:
        publish_from_another_process(clean_store.endpoint)
        (lifecycle,) = receive_until(ws, lambda e: e["type"] == "lifecycle")
        assert lifecycle["metadata"] == {
            "action": "instance-started",
            "source": "/1.0/instances/c1",
        }
        assert lifecycle["project"] == "default"
        assert lifecycle["location"] == "none"
        assert lifecycle["timestamp"].endswith("Z")

        op_id, event = held_operation(replica)
        release(replica, event)
        seen = receive_until(
            ws, lambda e: e["type"] == "operation" and e["metadata"]["status"] == "Success"
        )
        statuses = [e["metadata"]["status"] for e in seen if e["metadata"]["id"] == op_id]
        assert statuses[:2] == ["Pending", "Running"]
        assert statuses[-1] == "Success"
        assert seen[-1]["metadata"]["metadata"] == {"progress": "halfway", "answer": 42}


def test_event_type_filter(replica: Replica, clean_store: Any) -> None:
    with listen(replica, "?type=lifecycle") as ws:
        op_id, event = held_operation(replica)
        release(replica, event)
        replica.request("GET", f"/1.0/operations/{op_id}/wait")
        publish_from_another_process(clean_store.endpoint)
        # The operation's events came first, but this listener only wants lifecycle ones.
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "lifecycle"


@pytest.mark.parametrize("path", PATHS)
def test_event_project_filter(replica: Replica, clean_store: Any, path: str) -> None:
    with (
        listen(replica, "", path) as default_only,
        listen(replica, "?all-projects=true", path) as everything,
    ):
        publish_from_another_process(clean_store.endpoint, project="other")
        publish_from_another_process(clean_store.endpoint, project="default")
        assert json.loads(everything.recv(timeout=30))["project"] == "other"
        assert json.loads(everything.recv(timeout=30))["project"] == "default"
        assert json.loads(default_only.recv(timeout=30))["project"] == "default"


def test_a_listener_that_stops_reading_is_dropped(replica: Replica, clean_store: Any) -> None:
    """A client that does not read its events is closed (1001) once 1 MiB waits for it,
    instead of the replica buffering without end; other listeners are not held up."""
    count = 100  # 6.5 MB: more than the client's, the kernel's and the replica's buffers
    with (
        listen(replica, "?type=logging", "direct") as stalled,
        listen(replica, "?type=logging", "direct") as reader,
    ):
        publisher = subprocess.Popen(
            [sys.executable, "-c", PUBLISH_BIG, clean_store.endpoint, str(count)]
        )
        try:
            for i in range(count):
                assert json.loads(reader.recv(timeout=60))["metadata"]["message"].startswith(
                    f"{i} "
                )
        finally:
            assert publisher.wait(timeout=120) == 0
        received = 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                stalled.recv(timeout=30)
                received += 1
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert received < count
    wait_until(lambda: replica.ctx.hub.listeners == 0, 30, "both listeners to be gone")


def test_lxc_monitor_sees_profile_lifecycle(replica: Replica, second_replica: Replica) -> None:
    monitor = subprocess.Popen(
        ["lxc", "monitor", "--type=lifecycle", "--format=json"],
        env=second_replica.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert monitor.stdout is not None
        wait_until(lambda: second_replica.ctx.hub.listeners == 1, 30, "lxc monitor to connect")
        replica.request("POST", "/1.0/profiles", {"name": "m1"})
        line = monitor.stdout.readline()
        event = json.loads(line)
        assert event["type"] == "lifecycle"
        assert event["metadata"]["action"] == "profile-created"
        assert event["metadata"]["source"] == "/1.0/profiles/m1"
        assert event["metadata"]["requestor"] == {
            "username": "root",
            "protocol": "unix",
            "address": "@",
        }
    finally:
        monitor.kill()
        monitor.wait()


def test_bad_event_type_is_refused(replica: Replica) -> None:
    with pytest.raises(InvalidStatus) as refused:
        listen(replica, "?type=bogus")
    assert refused.value.response.status_code == 400
    body = json.loads(refused.value.response.body)
    assert body["error"] == '"bogus" isn\'t a supported event type'
    plain = replica.request("GET", "/1.0/events")
    assert plain.status == 400


PUBLISH_TOGETHER = """
import asyncio, sys
from croft.common import events
from croft.common.store import connect

async def main():
    store = await connect([sys.argv[1]])
    publisher = events.publisher(store)
    writes = [
        await publisher.event("logging", {"message": str(i), "level": "info", "context": {}})
        for i in range(3)
    ]
    await store.transaction(writes)
    await store.close()

asyncio.run(main())
"""


def record_writes(replica: Replica) -> list[bytes]:
    """The writes of events to the one listener written to directly (an `lxc` client's
    kind), as they happen."""
    hub = replica.ctx.hub
    wait_until(
        lambda: [s.writer is not None for s in hub._subscriptions] == [True],
        30,
        "the listener to be written to directly",
    )
    (subscription,) = list(hub._subscriptions)
    writes: list[bytes] = []
    real = subscription.writer
    assert real is not None

    def recording(frame: bytes, limit: int) -> bool:
        writes.append(frame)
        return real(frame, limit)

    subscription.writer = recording
    return writes


def stored_event(type: str, metadata: dict[str, Any]) -> bytes:
    """An event as the event log holds it (what the hub dispatches)."""
    event = Event(type, rfc3339_nano(), metadata, "none", "default")
    return json.dumps(event.to_lxd(), separators=(",", ":")).encode()


def test_the_end_of_an_operation_is_sent_at_once_with_what_came_before(replica: Replica) -> None:
    """Events that nobody waits for (lifecycle here) wait a little for the next one, so
    that ten `lxc` clients are woken once, not once per event; an operation's end, which
    clients wait for, is written as soon as it comes, with them. An event that nothing
    follows still goes out within FLUSH_DELAY."""
    started = stored_event("lifecycle", lifecycle_metadata("instance-started", "/1.0/c1"))
    ended = stored_event("operation", {"id": "op1", "status": "Success", "status_code": 200})
    hub = replica.ctx.hub

    async def apart() -> int:
        # On the hub's own loop, so that the order of timers decides, not the host's load.
        hub._dispatch(started)
        await asyncio.sleep(FLUSH_DELAY / 4)
        held = len(writes)
        hub._dispatch(ended)
        await asyncio.sleep(0)  # one turn of the loop: no timer has come due
        return held * 100 + len(writes)

    async def alone() -> None:
        hub._dispatch(started)

    with listen(replica, "", "direct") as ws:
        writes = record_writes(replica)
        assert replica.run(apart()) == 1  # nothing written while held, then one write
        received = [json.loads(ws.recv(timeout=30))["type"] for _ in range(2)]
        assert received == ["lifecycle", "operation"]
        assert len(writes) == 1
        assert writes[0].index(b'"lifecycle"') < writes[0].index(b'"Success"')
        replica.run(alone())
        assert json.loads(ws.recv(timeout=30))["type"] == "lifecycle"
        assert len(writes) == 2


def test_the_events_of_one_transaction_reach_a_listener_in_one_write(
    replica: Replica, clean_store: Any
) -> None:
    """An operation's Pending and Running events are written together: each write to a
    listener wakes its process, and every `lxc` client hears every operation's events."""
    with listen(replica, "?type=logging", "direct") as ws:
        writes = record_writes(replica)
        subprocess.run(
            [sys.executable, "-c", PUBLISH_TOGETHER, clean_store.endpoint], check=True, timeout=60
        )
        received = [json.loads(ws.recv(timeout=30))["metadata"]["message"] for _ in range(3)]
    assert received == ["0", "1", "2"]
    assert len(writes) == 1
    assert writes[0].count(b'"type":"logging"') == 3
