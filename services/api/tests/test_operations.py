"""Operations as clients see them from any api replica: listed, shown, waited for,
cancelled, failed when their replica dies, and gone a while after they end."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import unix_connect

from croft.api.operations import ORPHANED, OperationContext, operation_key
from croft.common.errors import InvalidArgument, PermissionDenied
from croft.common.records import modify
from croft.common.riders import Rider
from croft.common.store import Put, Update, dump
from croft.common.testing.waiting import wait_until

from .conftest import Replica

OWNER_PROCESS = Path(__file__).with_name("owner_process.py")


def held_operation(replica: Replica, **options: Any) -> tuple[str, asyncio.Event]:
    """An operation on `replica` whose task runs until the returned event is set."""

    async def create() -> tuple[str, asyncio.Event]:
        release = asyncio.Event()

        async def task(operation: OperationContext) -> dict[str, Any]:
            await operation.update_metadata({"progress": "halfway"})
            await release.wait()
            return {"answer": 42}

        op = await replica.ctx.operations.create("Testing", run=task, **options)
        return op["id"], release

    return replica.run(create())


def release(replica: Replica, event: asyncio.Event) -> None:
    replica.loop.call_soon_threadsafe(event.set)


def lxc_waits(replica: Replica, op_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    """`lxc query .../wait` on `replica` in a thread; the thread, and the dict the reply
    lands in. Gives the waiter half a second to get there first (tests hold either way)."""
    result: dict[str, Any] = {}

    def wait_with_lxc() -> None:
        query = replica.lxc("query", f"/1.0/operations/{op_id}/wait")
        result.update(json.loads(query.stdout))

    waiter = threading.Thread(target=wait_with_lxc)
    waiter.start()
    time.sleep(0.5)
    return waiter, result


def test_operation_is_seen_from_another_replica(replica: Replica, second_replica: Replica) -> None:
    op_id, event = held_operation(replica, resources={"instances": ["/1.0/instances/c1"]})

    table = second_replica.lxc("operation", "list", "--format", "csv").stdout
    assert f"{op_id},TASK,Testing,RUNNING" in table
    shown = yaml.safe_load(second_replica.lxc("operation", "show", op_id).stdout)
    assert shown["status"] == "Running"
    assert shown["status_code"] == 103
    assert shown["resources"] == {"instances": ["/1.0/instances/c1"]}

    listed = second_replica.request("GET", "/1.0/operations")
    assert listed.metadata == {"running": [f"/1.0/operations/{op_id}"]}
    deep = second_replica.request("GET", "/1.0/operations?recursion=1").metadata
    assert [op["id"] for op in deep["running"]] == [op_id]
    assert deep["running"][0]["metadata"] == {"progress": "halfway"}

    release(replica, event)
    done = second_replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=30").metadata
    assert done["status"] == "Success"
    assert done["metadata"] == {"progress": "halfway", "answer": 42}
    assert second_replica.request("GET", "/1.0/operations").metadata == {
        "success": [f"/1.0/operations/{op_id}"]
    }


def test_wait_on_another_replica_returns_when_the_operation_ends(
    replica: Replica, second_replica: Replica
) -> None:
    op_id, event = held_operation(replica)
    early = second_replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=0.2")
    assert (early.status, early.metadata["status"]) == (200, "Running")

    waiter, result = lxc_waits(second_replica, op_id)
    assert not result, "the wait returned before the operation ended"
    release(replica, event)
    waiter.join(60)
    assert result["status"] == "Success"
    assert result["id"] == op_id


def test_failing_task_reports_its_error(replica: Replica) -> None:
    async def create() -> str:
        async def task(operation: OperationContext) -> None:
            raise InvalidArgument("the image is not there")

        return (await replica.ctx.operations.create("Creating instance", run=task))["id"]

    op_id = replica.run(create())
    done = replica.request("GET", f"/1.0/operations/{op_id}/wait").metadata
    assert (done["status"], done["status_code"], done["err"]) == (
        "Failure",
        400,
        "the image is not there",
    )


def closing_operation(
    replica: Replica, key: str, *, interfere: bool, takes: float = 0.0
) -> tuple[str, dict[str, Any]]:
    """An operation whose task plays a service that commits the operation's end with its
    own change of `key` (a rider); with `interfere`, the operation record moves on after
    the end was prepared, as with a progress update. Returns its id and what the task saw."""
    seen: dict[str, Any] = {}

    async def create() -> str:
        async def task(operation: OperationContext) -> None:
            store = replica.ctx.store
            rider = Rider(await operation.closing_writes())
            seen["writes"] = len(rider.writes)
            if interfere:
                await operation.update_metadata({"progress": "moved on"})
            await asyncio.sleep(takes)
            await modify(store, key, lambda r: {**r, "done": True}, missing="?", rider=rider)
            seen["written"] = rider.written
            operation.closed = rider.written

        op = await replica.ctx.operations.create("Testing", run=task)
        return str(op["id"])

    return replica.run(create()), seen


def revisions(replica: Replica, *keys: str) -> list[int]:
    async def read() -> list[int]:
        entries = [await replica.ctx.store.get(key) for key in keys]
        return [entry.revision for entry in entries if entry is not None]

    return replica.run(read())


def test_a_service_can_end_the_operation_in_the_transaction_of_its_change(
    replica: Replica, second_replica: Replica
) -> None:
    """The end rides with the change: one transaction, the operation Success on every
    replica, and one Success event."""
    key = "/croft/records/test-closing/one"
    replica.run(replica.ctx.store.put(key, dump({"done": False})))
    with unix_connect(str(second_replica.socket), "ws://lxd/1.0/events?type=operation") as ws:
        op_id, seen = closing_operation(replica, key, interfere=False)
        done = second_replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=30")
        assert (done.metadata["status"], done.metadata["err"]) == ("Success", "")
        # Success is out once the change is committed, a moment before the task hears so
        wait_until(lambda: "written" in seen, 30, "the task to finish")
        assert seen == {"writes": 2, "written": True}  # the record and its event
        change, end = revisions(replica, key, operation_key(op_id))
        assert change == end  # one transaction
        statuses = []
        while "Success" not in statuses:
            event = json.loads(ws.recv(timeout=30))
            if event["metadata"]["id"] == op_id:
                statuses.append(event["metadata"]["status"])
        assert statuses == ["Pending", "Running", "Success"]
        with pytest.raises(TimeoutError):  # and no second end
            while True:
                event = json.loads(ws.recv(timeout=1))
                assert event["metadata"]["id"] != op_id, event


def test_an_end_committed_late_still_stays_readable_for_keep_finished(replica: Replica) -> None:
    """The service takes 2 s to commit the end it was handed: the operation is still
    there `keep_finished` (5 s) after it ended, as any other finished operation."""
    key = "/croft/records/test-closing/late"
    replica.run(replica.ctx.store.put(key, dump({"done": False})))
    op_id, seen = closing_operation(replica, key, interfere=False, takes=2.0)
    done = replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=30").metadata
    assert done["status"] == "Success"
    assert wait_until(lambda: seen.get("written"), 30, "the task to finish")
    time.sleep(4.5)
    assert replica.request("GET", f"/1.0/operations/{op_id}").status == 200


def test_an_operation_that_moved_on_is_ended_by_its_replica(replica: Replica) -> None:
    """The record changed after its end was prepared: the rider is dropped, the change is
    written alone, and the replica ends the operation (with the newer metadata)."""
    key = "/croft/records/test-closing/two"
    replica.run(replica.ctx.store.put(key, dump({"done": False})))
    op_id, seen = closing_operation(replica, key, interfere=True)
    done = replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=30").metadata
    assert (done["status"], done["metadata"]) == ("Success", {"progress": "moved on"})
    assert seen == {"writes": 2, "written": False}
    change, end = revisions(replica, key, operation_key(op_id))
    assert end > change
    record = replica.run(replica.ctx.store.get_json(key))
    assert record is not None and record[0] == {"done": True}


def test_cancel_from_another_replica(replica: Replica, second_replica: Replica) -> None:
    op_id, _ = held_operation(replica, may_cancel=True)
    second_replica.lxc("operation", "delete", op_id)
    shown = replica.request("GET", f"/1.0/operations/{op_id}").metadata
    assert (shown["status"], shown["status_code"]) == ("Cancelled", 401)

    again = second_replica.request("DELETE", f"/1.0/operations/{op_id}")
    assert (again.status, again.error) == (400, "Only running operations can be cancelled")

    stubborn, event = held_operation(replica)
    refused = second_replica.request("DELETE", f"/1.0/operations/{stubborn}")
    assert (refused.status, refused.error) == (400, "This operation can't be cancelled")
    assert replica.request("GET", f"/1.0/operations/{stubborn}").metadata["status"] == "Running"
    release(replica, event)

    missing = second_replica.request("DELETE", "/1.0/operations/nope")
    assert (missing.status, missing.error) == (404, "Operation not found")


def test_finished_operations_go_away(replica: Replica, second_replica: Replica) -> None:
    op_id, event = held_operation(replica)
    release(replica, event)
    replica.request("GET", f"/1.0/operations/{op_id}/wait")
    assert second_replica.request("GET", f"/1.0/operations/{op_id}").status == 200
    gone = wait_until(
        lambda: second_replica.request("GET", f"/1.0/operations/{op_id}").status == 404,
        30,
        "the finished operation to be removed",
    )
    assert gone
    reply = second_replica.request("GET", f"/1.0/operations/{op_id}")
    assert reply.error == "Operation not found"


def test_operation_of_a_killed_replica_is_reported_failed(
    replica: Replica, clean_store: Any
) -> None:
    owner = subprocess.Popen(
        [sys.executable, str(OWNER_PROCESS), clean_store.endpoint, "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        op_id = owner.stdout.readline().strip()
        assert op_id, "the owner process printed no operation id"
        shown = replica.request("GET", f"/1.0/operations/{op_id}").metadata
        assert shown["status"] == "Running"
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)

        def failed() -> dict[str, Any] | None:
            op = replica.request("GET", f"/1.0/operations/{op_id}").metadata
            return op if op["status"] != "Running" else None

        op = wait_until(failed, 30, "the dead owner's operation to be reported")
        assert (op["status"], op["status_code"], op["err"]) == ("Failure", 400, ORPHANED)
        # A waiter learns it too, and so does `lxc operation show`.
        waited = replica.request("GET", f"/1.0/operations/{op_id}/wait").metadata
        assert waited["status"] == "Failure"
        shown = yaml.safe_load(replica.lxc("operation", "show", op_id).stdout)
        assert shown["err"] == ORPHANED
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize(
    ("made", "status"),
    [("whole", "Success"), ("half", "Failure"), ("before", "Failure"), ("never", "Failure")],
)
def test_killed_replica_whose_operation_had_made_its_record_reports_it_done(
    replica: Replica, clean_store: Any, made: str, status: str
) -> None:
    """An owner killed after its task created the record (`done_if_created`) but before
    it recorded the end: done if the record is whole and younger than the operation."""
    key = "/croft/records/instances/default/c1"
    state = {"whole": "created", "half": "creating", "before": "created"}.get(made)

    def make() -> None:
        record = {"name": "c1", "_croft": {"state": state}}
        replica.run(replica.ctx.store.create(key, json.dumps(record).encode()))

    if made == "before":
        make()
    owner = subprocess.Popen(
        [sys.executable, str(OWNER_PROCESS), clean_store.endpoint, "2", key],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        op_id = owner.stdout.readline().strip()
        assert op_id, "the owner process printed no operation id"
        if made in ("whole", "half"):
            make()
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        op = replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=30").metadata
        assert op["status"] == status
        assert op["err"] == ("" if status == "Success" else ORPHANED)
    finally:
        owner.kill()
        owner.wait()


def test_stopping_a_replica_fails_its_running_operations(
    replica: Replica, second_replica: Replica
) -> None:
    op_id, _ = held_operation(second_replica)
    second_replica.stop()
    op = replica.request("GET", f"/1.0/operations/{op_id}").metadata
    assert (op["status"], op["err"]) == ("Failure", ORPHANED)


class EchoSocket:
    """A websocket operation hook (exec will plug in the same way)."""

    async def connect(self, operation: OperationContext, secret: str, websocket: WebSocket) -> None:
        if secret != "s3cret":
            raise PermissionDenied("not authorized")
        await websocket.accept()
        await websocket.send_text(f"hello from {operation.id}")
        await websocket.close()


def test_websocket_operation_hook(replica: Replica, second_replica: Replica) -> None:
    async def create() -> str:
        op = await replica.ctx.operations.create(
            "Executing command",
            cls="websocket",
            websocket=EchoSocket(),
            metadata={"fds": {"0": "s3cret"}},
        )
        return str(op["id"])

    op_id = replica.run(create())
    path = f"/1.0/operations/{op_id}/websocket"
    with unix_connect(str(replica.socket), f"ws://lxd{path}?secret=s3cret") as ws:
        assert ws.recv(timeout=10) == f"hello from {op_id}"

    with pytest.raises(InvalidStatus) as refused:
        unix_connect(str(replica.socket), f"ws://lxd{path}?secret=wrong")
    assert refused.value.response.status_code == 403

    with pytest.raises(InvalidStatus) as elsewhere:
        unix_connect(str(second_replica.socket), f"ws://lxd{path}?secret=s3cret")
    assert elsewhere.value.response.status_code == 503

    replica.run(replica.ctx.operations.finish(op_id))
    assert replica.request("GET", f"/1.0/operations/{op_id}").metadata["status"] == "Success"


def test_an_operation_whose_closing_writes_fail_still_ends(replica: Replica) -> None:
    """Writes that go with an operation's end and cannot be written (an event under a
    lease gone meanwhile, an update of a record that moved on) are dropped: the end is
    recorded alone, with its result, and the operation can be waited for."""
    key = "/croft/records/test-closing/stale"
    replica.run(replica.ctx.store.put(key, dump({"n": 1})))

    async def create(kind: str) -> str:
        store = replica.ctx.store

        async def task(operation: OperationContext) -> dict[str, Any]:
            if kind == "lease":
                lease = await store.grant_lease(30)
                operation.final_writes.append(Put("/croft/events/test-gone", b"{}", lease=lease.id))
                await store.revoke_lease(lease)
            else:
                entry = await store.get(key)
                assert entry is not None
                operation.final_writes.append(Update(key, b'{"n": 2}', entry.revision))
                await store.put(key, dump({"n": 3}))  # it moves on before the end
            return {"return": 7}

        return str((await replica.ctx.operations.create("Testing", run=task))["id"])

    for kind in ("lease", "revision"):
        op_id = replica.run(create(kind))
        done = replica.request("GET", f"/1.0/operations/{op_id}/wait?timeout=30").metadata
        assert (done["status"], done["metadata"]) == ("Success", {"return": 7}), kind
    assert replica.run(replica.ctx.store.get_json(key))[0] == {"n": 3}  # type: ignore[index]


def compact_store(replica: Replica) -> int:
    """Compact the store's history up to now (as etcd's auto-compaction does)."""

    async def now() -> int:
        for _ in range(2):  # history up to the revision compacted at is gone, not that one
            await replica.ctx.store.put("/croft/records/test-compact/tick", b"{}")
        return await replica.ctx.store.revision()

    revision = replica.run(now())
    endpoints = ",".join(replica.endpoints)
    subprocess.run(
        ["etcdctl", f"--endpoints={endpoints}", "compact", str(revision)],
        check=True,
        capture_output=True,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    return revision


def test_wait_on_an_operation_older_than_the_store_history_still_waits(
    replica: Replica, second_replica: Replica
) -> None:
    """Its record was last written before the history etcd still keeps: `/wait` reads
    it anew and follows it from now (pylxd's `operation.wait()` uses it)."""
    op_id, event = held_operation(replica)
    compact_store(replica)
    for where in (replica, second_replica):
        early = where.request("GET", f"/1.0/operations/{op_id}/wait?timeout=0.5")
        assert early.status == 200, early
        assert early.metadata["status"] == "Running"

    waiter, result = lxc_waits(second_replica, op_id)
    compact_store(replica)  # and again while it waits
    assert not result, "the wait returned before the operation ended"
    release(replica, event)
    waiter.join(60)
    assert (result["status"], result["metadata"]["answer"]) == ("Success", 42)


def test_a_websocket_upgrade_with_a_long_request_line_is_answered(replica: Replica) -> None:
    """As LXD: a request line of 9 KiB is a request line; the upgrade gets the answer the
    same request gets without one (an operation that does not exist: 404, in LXD's
    envelope). A head beyond any limit gets an HTTP error, not silence."""
    secret = "a" * 9000
    path = f"/1.0/operations/{'0' * 8}-0000-0000-0000-{'0' * 12}/websocket?secret={secret}"
    upgrade = (
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )

    def ask(head: str) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(replica.socket))
            sock.sendall(head.encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    plain = replica.request("GET", path)
    assert (plain.status, plain.error) == (404, "Operation not found")
    answer = ask(f"GET {path} HTTP/1.1\r\nHost: lxd\r\n{upgrade}\r\n")
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 404 "), answer[:300]
    assert json.loads(body)["error"] == "Operation not found"

    huge = ask(f"GET /1.0 HTTP/1.1\r\nHost: lxd\r\nX-Big: {'b' * 20000}\r\n{upgrade}\r\n")
    assert huge.startswith(b"HTTP/1.1 4"), huge[:300]
