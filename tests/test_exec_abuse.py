"""What a careless or hostile client does to exec and file push (issue 21): a command that
outlives the event log's lease, output nobody reads, bad control messages, an upload cut
short. Real `lxc`, raw websockets and raw HTTP over croft's unix socket, a real container."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, unix_connect

from croft.common.testing.waiting import UnixHTTPConnection, wait_until

from .conftest import Croft, Lxc

MiB = 1 << 20


class Api:
    """LXD's REST API over croft's unix socket, spoken by hand."""

    def __init__(self, lxc: Lxc) -> None:
        self.socket = str(lxc.lxd_dir / "unix.socket")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        connection = UnixHTTPConnection(self.socket, timeout=120.0)
        try:
            payload = None if body is None else json.dumps(body)
            connection.request(method, path, body=payload)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def exec(self, name: str, command: list[str], **options: Any) -> tuple[str, dict[str, str]]:
        """Start an exec that waits for its websockets: its operation id and fds."""
        body = {"command": command, "wait-for-websocket": True, "interactive": False, **options}
        status, reply = self.request("POST", f"/1.0/instances/{name}/exec", body)
        assert status == 202, reply
        operation = reply["metadata"]
        return operation["id"], operation["metadata"]["fds"]

    def websocket(self, op_id: str, secret: str, **options: Any) -> ClientConnection:
        return unix_connect(
            self.socket,
            f"ws://lxd/1.0/operations/{op_id}/websocket?secret={secret}",
            **options,
        )

    def wait(self, op_id: str, timeout: float = 120) -> dict[str, Any]:
        status, reply = self.request("GET", f"/1.0/operations/{op_id}/wait?timeout={timeout}")
        assert status == 200, reply
        operation: dict[str, Any] = reply["metadata"]
        return operation


def read_until_end(ws: ClientConnection, timeout: float = 120) -> bytes:
    """A stream's bytes up to its end (LXD's empty text frame, or the close)."""
    data = bytearray()
    try:
        while True:
            message = ws.recv(timeout=timeout)
            if message == "":
                break
            data += message if isinstance(message, bytes) else message.encode()
    except Exception as exc:  # the close
        if "1000" not in str(exc) and "close" not in str(exc).lower():
            raise
    return bytes(data)


@pytest.fixture(scope="module")
def api(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> Api:
    return Api(croft_lxc[1])


def test_an_exec_longer_than_the_event_lease_ends_with_its_exit_code(
    croft_lxc: tuple[Croft, Lxc, str], api: Api, c1: str
) -> None:
    """45 s: longer than the life of the event log's lease at the command's start."""
    _, lxc, _ = croft_lxc
    by_lxc: dict[str, Any] = {}

    def run_with_lxc() -> None:
        result = lxc("exec", c1, "--", "sh", "-c", "sleep 45; exit 3", check=False, timeout=150)
        by_lxc["code"] = result.returncode

    thread = threading.Thread(target=run_with_lxc)
    thread.start()
    command = ["sh", "-c", "sleep 45; echo slept; exit 4"]
    events = unix_connect(api.socket, "ws://lxd/1.0/events?type=lifecycle", ping_interval=None)
    op_id, fds = api.exec(c1, command)
    sockets = {fd: api.websocket(op_id, fds[fd]) for fd in ("0", "1", "2")}
    try:
        assert read_until_end(sockets["1"]) == b"slept\n"
        done = api.wait(op_id)
        # Its lifecycle event is not lost on the way either.
        while True:
            event = json.loads(events.recv(timeout=30))["metadata"]
            if event["action"] == "instance-exec" and event["context"]["command"] == command:
                break
    finally:
        for ws in [*sockets.values(), events]:
            ws.close()
    thread.join(150)
    assert (done["status"], done["metadata"]["return"]) == ("Success", 4)
    assert by_lxc == {"code": 3}
    # And nothing is left Running.
    _, listed = api.request("GET", "/1.0/operations?recursion=1")
    running = [op for op in listed["metadata"].get("running") or [] if op["id"] == op_id]
    assert running == []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def growth_mib(before: dict[int, int]) -> dict[int, int]:
    """How many MiB each process in `before` (pid -> RSS in KiB) grew at its peak over
    the next five seconds."""
    peaks = dict(before)
    for _ in range(10):
        time.sleep(0.5)
        for pid in peaks:
            peaks[pid] = max(peaks[pid], rss_kib(pid))
    return {pid: (peaks[pid] - before[pid]) // 1024 for pid in peaks}


def service_pid(croft: Croft, service: str) -> int:
    for pid in croft.processes():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"croft.{service}".encode() in argv:
            return pid
    raise AssertionError(f"no croft {service} process")


def writing_state(argv: list[bytes]) -> str:
    """ "blocked" when the host process running `argv` (in the container) sleeps on a
    full pipe, "gone" when there is none, else "running"."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().split(b"\0")[:-1] != argv:
                continue
            wchan = (entry / "wchan").read_text()  # pipe_write, anon_pipe_write...
            return "blocked" if wchan.endswith("pipe_write") else "running"
        except OSError:
            continue
    return "gone"


def test_output_nobody_reads_holds_the_command_not_compute_memory(
    croft_lxc: tuple[Croft, Lxc, str], api: Api, c1: str
) -> None:
    """200 MiB of output to a client that connects stdout and does not read it: the
    command blocks on its full pipe, as under LXD, and compute's memory stays where it
    was; once the client reads, every byte comes and the exec ends Success."""
    croft, _, _ = croft_lxc
    compute, api_pid = service_pid(croft, "compute"), service_pid(croft, "api")
    before = {compute: rss_kib(compute), api_pid: rss_kib(api_pid)}
    size = 200 * MiB
    op_id, fds = api.exec(c1, ["head", "-c", str(size), "/dev/zero"])
    # The client's library takes a few frames, then leaves the socket unread.
    sockets = {
        fd: api.websocket(op_id, fds[fd], max_queue=2, ping_interval=None) for fd in ("0", "1", "2")
    }
    try:
        argv = [b"head", b"-c", str(size).encode(), b"/dev/zero"]

        def status() -> str:
            return str(api.request("GET", f"/1.0/operations/{op_id}")[1]["metadata"]["status"])

        # Blocked, or (when nothing holds it back) finished.
        wait_until(
            lambda: writing_state(argv) == "blocked" or status() != "Running",
            120,
            "the command to block",
        )
        grown = growth_mib(before)  # and it stays so
        assert grown[compute] < 32, f"compute grew {grown[compute]} MiB"
        assert grown[api_pid] < 32, f"the api grew {grown[api_pid]} MiB"
        assert writing_state(argv) == "blocked", "the command wrote everything, unread"
        assert status() == "Running"

        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(read_until_end(sockets["2"])))
        reader.start()
        received = 0
        while True:
            message = sockets["1"].recv(timeout=120)
            if message == "":
                break
            received += len(message)
        reader.join(60)
        done = api.wait(op_id)
    finally:
        for ws in sockets.values():
            ws.close()
    assert received == size
    assert errors == [b""]
    assert (done["status"], done["metadata"]["return"]) == ("Success", 0)


def test_stdin_a_command_does_not_read_holds_the_client_not_croft_memory(
    croft_lxc: tuple[Croft, Lxc, str], api: Api, c1: str
) -> None:
    """The other way: a client pours 400 MiB into the stdin of a command that never
    reads it. The pipes fill (lxc-attach's take about 100 MiB, in the kernel), then
    compute stops taking input, then the api, then the client's sends block; neither
    service holds what it could not pass on."""
    croft, _, _ = croft_lxc
    compute, api_pid = service_pid(croft, "compute"), service_pid(croft, "api")
    before = {compute: rss_kib(compute), api_pid: rss_kib(api_pid)}
    script = 'trap "exit 7" USR1; echo ready; while :; do sleep 0.1; done # stdin-hog'
    op_id, fds = api.exec(c1, ["sh", "-c", script])
    sockets = {fd: api.websocket(op_id, fds[fd], ping_interval=None) for fd in ("0", "1", "2")}
    sent = [0]
    total = 400 * MiB

    def pour() -> None:
        piece = b"z" * MiB
        with contextlib.suppress(ConnectionClosed):  # when the command ends
            while sent[0] < total:
                sockets["0"].send(piece)
                sent[0] += len(piece)

    try:
        assert sockets["1"].recv(timeout=60) == b"ready\n"
        threading.Thread(target=pour, daemon=True).start()
        progress = -1
        while progress != sent[0]:  # until the client's sends stop going through
            progress = sent[0]
            time.sleep(2)
        grown = growth_mib(before)
        assert grown[compute] < 32, f"compute grew {grown[compute]} MiB"
        assert grown[api_pid] < 32, f"the api grew {grown[api_pid]} MiB"
        assert sent[0] < total, "all of it went somewhere"
    finally:
        # From the host: a signal through the exec's control would queue behind the
        # stdin nobody takes (one gRPC stream carries both).
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0] == b"sh" and b"stdin-hog" in argv[-2]:  # not lxc-attach
                    os.kill(int(entry.name), signal.SIGUSR1)
        done = api.wait(op_id)
        for ws in sockets.values():
            ws.close()
    assert (done["status"], done["metadata"]["return"]) == ("Success", 7)


def test_a_bad_control_message_does_not_stop_the_signals_after_it(api: Api, c1: str) -> None:
    script = 'trap "echo got-usr1; exit 9" USR1; echo ready; while :; do sleep 0.1; done'
    op_id, fds = api.exec(c1, ["sh", "-c", script])
    sockets = {fd: api.websocket(op_id, fds[fd]) for fd in ("0", "1", "2", "control")}
    try:
        assert sockets["1"].recv(timeout=60) == b"ready\n"
        control = sockets["control"]
        for bad in (
            "not json",
            "[1, 2]",
            '"a string"',
            '{"command": "window-resize", "args": {"width": "abc", "height": "24"}}',
            '{"command": "window-resize", "args": [80, 24]}',
            '{"command": "window-resize", "args": {"width": "99999999999", "height": "1"}}',
            '{"command": "signal", "signal": 99999999999}',
            '{"command": "signal", "signal": 1000}',
            '{"command": "signal", "signal": "TERM"}',
        ):
            control.send(bad)
        control.send(json.dumps({"command": "signal", "signal": 10}))  # SIGUSR1
        assert read_until_end(sockets["1"], timeout=60) == b"got-usr1\n"
        done = api.wait(op_id)
    finally:
        for ws in sockets.values():
            ws.close()
    assert (done["status"], done["metadata"]["return"]) == ("Success", 9)


def in_c1(lxc: Lxc, c1: str, script: str) -> str:
    return lxc("exec", c1, "--", "sh", "-c", script).stdout


def test_a_push_cut_short_leaves_the_file_as_it_was(
    croft_lxc: tuple[Croft, Lxc, str], api: Api, c1: str, tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    old = tmp_path / "old"
    old.write_bytes(b"the old content\n" * 8)
    lxc("file", "push", str(old), f"{c1}/root/kept", "--mode", "0640", "--uid", "7")
    in_c1(lxc, c1, "rm -f /root/fresh")

    def cut_short(path: str, changed: Callable[[], bool]) -> None:
        """Send half of a 4 MiB body, wait for it to reach the container, hang up."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(api.socket)
        head = (
            f"POST /1.0/instances/{c1}/files?path={path} HTTP/1.1\r\nHost: lxd\r\n"
            "Content-Type: application/octet-stream\r\nX-LXD-type: file\r\n"
            "X-LXD-mode: 0600\r\nX-LXD-uid: 0\r\nX-LXD-gid: 0\r\n"
            f"Content-Length: {4 * MiB}\r\n\r\n"
        )
        sock.sendall(head.encode() + b"x" * (2 * MiB))
        try:
            wait_until(changed, 60, f"the upload to {path} to reach the container")
        finally:
            sock.close()

    def kept_touched() -> bool:
        # A temporary file beside it, or (where pushes write in place) kept itself.
        listing = in_c1(lxc, c1, "ls -a /root; stat -c 'size=%s' /root/kept")
        return ".croft-" in listing or "size=128\n" not in listing

    def fresh_touched() -> bool:
        listing = in_c1(lxc, c1, "ls -a /root")
        return ".croft-" in listing or "fresh" in listing.split()

    for path, touched in (("/root/kept", kept_touched), ("/root/fresh", fresh_touched)):
        cut_short(path, touched)
        wait_until(
            lambda: ".croft-" not in in_c1(lxc, c1, "ls -a /root"),
            60,
            "the unfinished upload to be cleaned up",
        )
    assert in_c1(lxc, c1, "cat /root/kept") == "the old content\n" * 8
    assert in_c1(lxc, c1, "stat -c '%a %u' /root/kept") == "640 7\n"
    assert "fresh" not in in_c1(lxc, c1, "ls /root").split()

    # One compute refuses while its body still comes is answered with why.
    connection = UnixHTTPConnection(api.socket, timeout=120.0)
    try:
        connection.request(
            "POST", f"/1.0/instances/{c1}/files?path=/root", body=b"y" * (8 * MiB),
            headers={"X-LXD-type": "file", "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        response = connection.getresponse()
        refused = (response.status, json.loads(response.read())["error"])
    finally:
        connection.close()
    assert refused == (400, '"/root" is a directory in the instance')

    # A whole upload over it replaces it, with the mode and owner it was sent with.
    new = tmp_path / "new"
    new.write_bytes(b"new\n")
    lxc("file", "push", str(new), f"{c1}/root/kept", "--mode", "0600", "--uid", "5")
    assert in_c1(lxc, c1, "cat /root/kept; stat -c '%a %u' /root/kept") == "new\n600 5\n"


def test_a_command_that_exits_while_its_stdin_still_comes_ends_with_its_code(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """The client is still writing stdin when the command exits: the write fails, and
    that is no reason to report the exec failed."""
    _, lxc, _ = croft_lxc
    flood = "x" * (20 * MiB)
    for _ in range(15):  # a race: it does not lose every time
        taken = lxc("exec", c1, "--", "head", "-c", "1", input=flood, check=False)
        assert (taken.returncode, taken.stdout, taken.stderr) == (0, "x", "")
    refused = lxc("exec", c1, "--", "sh", "-c", "exit 5", input=flood, check=False)
    assert (refused.returncode, refused.stderr) == (5, "")
