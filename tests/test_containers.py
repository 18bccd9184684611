"""Containers through LXD's API: the real `lxc` client against croft's services, with real
unprivileged LXC containers on a real bridge (issue 3)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import yaml

from croft.common import rpc
from croft.common.clients import ComputeClient
from croft.common.models import InstanceRecord
from croft.common.testing.waiting import wait_until
from croft.v1 import common_pb2, compute_pb2_grpc

from .conftest import REPO, Croft, Lxc


def ipv4_of(lxc: Lxc, name: str) -> str:
    (instance,) = [i for i in lxc.json("list") if i["name"] == name]
    network = (instance.get("state") or {}).get("network") or {}
    for address in network.get("eth0", {}).get("addresses", []):
        if address["family"] == "inet":
            return str(address["address"])
    return ""


def test_image_import_and_list(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    images = lxc.json("image", "list")
    assert [a["name"] for a in images[0]["aliases"]] == ["busybox"]
    assert len(images[0]["fingerprint"]) == 64


def test_a_launch_records_the_use_of_its_image(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    first = lxc.json("image", "list")[0]["last_used_at"]
    assert not first.startswith("0001-")  # c1's launch used it
    time.sleep(1.1)  # uses within one second are recorded once
    lxc("init", "busybox", "c-uses")
    try:
        assert lxc.json("image", "list")[0]["last_used_at"] > first
    finally:
        lxc("delete", "c-uses")


def test_launched_container_runs_with_an_address_from_the_bridge(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    croft, lxc, bridge = croft_lxc
    (instance,) = [i for i in lxc.json("list") if i["name"] == c1]
    assert instance["status"] == "Running"
    network = json.loads(croft.run("status", "--format", "json").stdout)  # croft is healthy
    assert network
    gateway = (
        subprocess.run(["ip", "-4", "-o", "addr", "show", bridge], capture_output=True, text=True)
        .stdout.split()[3]
        .split("/")[0]
    )
    address = wait_until(lambda: ipv4_of(lxc, c1), 30, "c1 to get an IPv4 address")
    assert address.rsplit(".", 1)[0] == gateway.rsplit(".", 1)[0]
    assert "RUNNING" in lxc("list", c1).stdout

    # As with LXD, the host side of a bridged NIC has no IPv6 of its own; the container's
    # side keeps its IPv6 link-local address.
    state = json.loads(lxc("query", f"/1.0/instances/{c1}/state").stdout)
    eth0 = state["network"]["eth0"]
    veth = eth0["host_name"]
    assert veth in os.listdir(f"/sys/class/net/{bridge}/brif")
    assert Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").read_text() == "1\n"
    assert Path(f"/proc/sys/net/ipv6/conf/{veth}/accept_ra").read_text() == "0\n"
    host_side = subprocess.run(
        ["ip", "-6", "-o", "addr", "show", "dev", veth], capture_output=True, text=True
    )
    assert host_side.returncode == 0 and host_side.stdout == ""
    assert any(a["family"] == "inet6" and a["scope"] == "link" for a in eth0["addresses"])


def test_exec_prints_and_exits_like_the_command(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    result = lxc("exec", c1, "--", "sh", "-c", "echo $((6*7))")
    assert result.stdout == "42\n"
    assert result.returncode == 0
    assert lxc("exec", c1, "--", "sh", "-c", "exit 3", check=False).returncode == 3
    both = lxc("exec", c1, "--", "sh", "-c", "echo out; echo err >&2; exit 5", check=False)
    assert (both.stdout, both.stderr, both.returncode) == ("out\n", "err\n", 5)
    assert lxc("exec", c1, "--", "cat", input="piped stdin\n").stdout == "piped stdin\n"


def test_interactive_exec_through_a_pty_sees_a_window_resize(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    _, lxc, _ = croft_lxc
    pid, fd = pty.fork()
    if pid == 0:  # the child: lxc on a terminal, as a person would run it
        os.execvpe("lxc", ["lxc", "exec", c1, "--", "sh"], lxc.env)
    output = bytearray()

    def read_until(marker: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, f"no {marker!r} in {bytes(output)!r}"
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 4096)
                output.extend(chunk)
                if b"\x1b[6n" in chunk:  # the shell asks where the cursor is, as terminals answer
                    os.write(fd, b"\x1b[1;3R")

    try:
        read_until(b"# \x1b[6n")  # the prompt, then the line editor's cursor query (answered)
        time.sleep(0.5)  # ash discards what arrives in the same read as the cursor reply
        os.write(fd, b"echo ready-$((40+2))\n")
        read_until(b"ready-42")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        os.kill(pid, 28)  # SIGWINCH: the client sends window-resize on the control socket
        time.sleep(1)
        output.clear()
        os.write(fd, b"stty size; exit 7\n")
        read_until(b"33 111")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        os.close(fd)


def test_console_attaches_both_ways_detaches_and_keeps_a_log(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    _, lxc, _ = croft_lxc
    lxc("query", "-X", "DELETE", f"/1.0/instances/{c1}/console")
    terminals: list[tuple[int, int]] = []

    def attach() -> tuple[int, int, bytearray]:
        pid, fd = pty.fork()
        if pid == 0:  # the child: `lxc console` on a terminal, as a person would run it
            os.execvpe("lxc", ["lxc", "console", c1], lxc.env)
        terminals.append((pid, fd))
        return pid, fd, bytearray()

    def read_until(fd: int, output: bytearray, marker: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, f"no {marker!r} in {bytes(output)!r}"
            if select.select([fd], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):  # EIO: the client exited
                    output.extend(os.read(fd, 4096))

    def exit_code(pid: int, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        raise AssertionError(f"lxc console (pid {pid}) did not exit")

    try:
        pid, fd, output = attach()
        read_until(fd, output, b"ctrl>+a q")
        time.sleep(1)  # the client reads the operation, then connects its websockets
        # What the instance writes to its console reaches the client...
        lxc("exec", c1, "--", "sh", "-c", "echo console-says-$((6*7)) > /dev/console")
        read_until(fd, output, b"console-says-42")
        # ...and what the client types reaches what reads the console.
        reader = subprocess.Popen(
            ["lxc", "exec", c1, "--", "sh", "-c", "head -n1 /dev/console"],
            env=lxc.env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)
        os.write(fd, b"typed-in-the-console\r")
        assert reader.communicate(timeout=20)[0] == "typed-in-the-console\n"

        # One client at a time, as liblxc allows: the second is told so.
        second, second_fd, second_output = attach()
        assert exit_code(second) == 1
        read_until(second_fd, second_output, b"Error: Could not attach to the console")

        # <ctrl>+a q detaches (two reads: the client looks at the first byte of each).
        os.write(fd, b"\x01")
        time.sleep(0.3)
        os.write(fd, b"q")
        assert exit_code(pid) == 0
        assert lxc("exec", c1, "--", "true").returncode == 0  # the instance did not notice
    finally:
        for child, terminal in terminals:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, 9)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
            os.close(terminal)

    log = lxc("console", "--show-log", c1).stdout
    assert "console-says-42" in log and "typed-in-the-console" in log
    lxc("query", "-X", "DELETE", f"/1.0/instances/{c1}/console")
    assert "console-says-42" not in lxc("console", "--show-log", c1).stdout

    vga = lxc("query", "-X", "POST", "-d", '{"type": "vga"}', f"/1.0/instances/{c1}/console",
              check=False)  # fmt: skip
    assert "VGA console is only supported by virtual machines" in vga.stderr
    lxc("init", "busybox", "quiet")
    try:
        stopped = lxc("query", "-X", "POST", "-d", "{}", "/1.0/instances/quiet/console",
                      check=False)  # fmt: skip
        assert "Instance is not running" in stopped.stderr
    finally:
        lxc("delete", "quiet")


def test_file_push_pull_round_trip_keeps_bytes_mode_and_owner(
    croft_lxc: tuple[Croft, Lxc, str], c1: str, tmp_path: Path
) -> None:
    _, lxc, _ = croft_lxc
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(10 << 20))
    lxc(
        "file",
        "push",
        str(payload),
        f"{c1}/root/payload.bin",
        "--mode",
        "0640",
        "--uid",
        "1000",
        "--gid",
        "1001",
    )
    inside = lxc("exec", c1, "--", "stat", "-c", "%a %u %g %s", "/root/payload.bin").stdout.split()
    assert inside == ["640", "1000", "1001", str(10 << 20)]
    back = tmp_path / "back.bin"
    lxc("file", "pull", f"{c1}/root/payload.bin", str(back))
    assert (
        hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload.read_bytes()).digest()
    )


def test_memory_limit_applies_live(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    lxc("config", "set", c1, "limits.memory", "64MiB")
    pid = lxc.json("list")[0]["state"]["pid"]
    cgroup = next(
        line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if ":memory:" in line
    )
    limit = Path(f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes").read_text()
    assert int(limit) == 64 << 20
    hog = lxc(
        "exec", c1, "--", "sh", "-c", "dd if=/dev/zero of=/dev/null bs=200M count=1", check=False
    )
    assert hog.returncode == 137  # killed by the OOM killer
    assert lxc.json("list")[0]["status"] == "Running"
    lxc("config", "unset", c1, "limits.memory")


def test_a_listing_shows_each_instance_its_own_state_and_snapshots(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """`lxc list` (recursion=2): states come in one call per member, snapshots in one
    read; each must still land on its own instance."""
    _, lxc, _ = croft_lxc
    lxc("init", "busybox", "l2")
    try:
        lxc("snapshot", "l2", "only")
        listed = {i["name"]: i for i in lxc.json("list")}
        assert listed["l2"]["state"]["status"] == "Stopped"
        assert [s["name"] for s in listed["l2"]["snapshots"]] == ["only"]
        running = listed[c1]["state"]
        assert running["status"] == "Running" and running["pid"] > 0
        assert running["network"]["lo"]["addresses"][0]["address"] == "127.0.0.1"
        assert running["network"]["eth0"]["host_name"]
        own = json.loads(lxc("query", f"/1.0/instances/{c1}/snapshots").stdout)
        assert [
            f"/1.0/instances/{c1}/snapshots/{s['name']}" for s in listed[c1]["snapshots"]
        ] == own
    finally:
        lxc("delete", "l2")


def test_rename_moves_the_instance_and_refuses_what_lxd_refuses(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    croft, lxc, _ = croft_lxc
    state = croft.root / "state"
    lxc("init", "busybox", "rn1")
    current = "rn1"
    try:
        lxc("snapshot", "rn1", "s1")
        # LXD 5.0.2's answers; none of them changes anything.
        refused = {
            (c1, "rn9"): "Renaming of running container not allowed",
            ("rn1", c1): f'Name "{c1}" already in use',
            ("rn1", "rn1"): 'Name "rn1" already in use',
            ("rn1", "bad_name"): "Invalid instance name",
        }
        for (old, new), message in refused.items():
            result = lxc("rename", old, new, check=False)
            assert result.returncode != 0 and message in result.stderr, (old, new, result.stderr)
        assert {"rn1", c1} <= {i["name"] for i in lxc.json("list")}

        lxc("rename", "rn1", "rn2")
        current = "rn2"
        names = {i["name"] for i in lxc.json("list")}
        assert "rn2" in names and "rn1" not in names
        assert lxc("info", "rn1", check=False).returncode != 0
        snapshots = json.loads(lxc("query", "/1.0/instances/rn2/snapshots").stdout)
        assert snapshots == ["/1.0/instances/rn2/snapshots/s1"]
        assert (state / "lxc" / "rn2").is_dir() and not (state / "lxc" / "rn1").exists()
        volumes = state / "storage-pools" / "default" / "containers"
        assert (volumes / "rn2").is_dir() and not (volumes / "rn1").exists()

        lxc("start", "rn2")
        assert lxc("exec", "rn2", "--", "hostname").stdout == "rn2\n"
        address = wait_until(lambda: ipv4_of(lxc, "rn2"), 30, "rn2 to get an IPv4 address")
        # the DHCP and DNS entries follow the name (a lookup under load may time out:
        # asked again until it answers, and it must answer with rn2's address)
        wait_until(
            lambda: address in lxc("exec", c1, "--", "nslookup", "rn2.croft", check=False).stdout,
            30,
            "rn2.croft to resolve to rn2's address",
        )
        lxc("stop", "--force", "rn2")
        lxc("restore", "rn2", "s1")
    finally:
        lxc("delete", "--force", current)


def test_snapshot_and_restore_bring_a_file_back(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc
    lxc("exec", c1, "--", "sh", "-c", "echo before > /root/state")
    lxc("snapshot", c1, "s1")
    lxc("exec", c1, "--", "sh", "-c", "echo after > /root/state; touch /root/new")
    lxc("restore", c1, "s1")
    assert lxc("exec", c1, "--", "cat", "/root/state").stdout == "before\n"
    assert lxc("exec", c1, "--", "test", "-e", "/root/new", check=False).returncode == 1
    snapshots = json.loads(lxc("query", f"/1.0/instances/{c1}/snapshots").stdout)
    assert snapshots == [f"/1.0/instances/{c1}/snapshots/s1"]


def test_stop_start_restart(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    _, lxc, _ = croft_lxc

    def status() -> str:
        return str(lxc.json("list")[0]["status"])

    lxc("stop", c1)
    assert status() == "Stopped"
    lxc("start", c1)
    assert status() == "Running"
    pid = lxc.json("list")[0]["state"]["pid"]
    lxc("restart", c1)
    assert status() == "Running"
    assert lxc.json("list")[0]["state"]["pid"] != pid
    lxc("stop", "--force", c1)
    assert status() == "Stopped"
    lxc("start", c1)
    # Refused starts, as LXD words them, change nothing.
    pid = lxc.json("list")[0]["state"]["pid"]
    again = lxc("start", c1, check=False)
    assert again.returncode != 0
    assert "The instance is already running" in again.stderr
    lxc("pause", c1)
    # (`lxc start` would unfreeze it: ask for a start through the API itself.)
    path, start = f"/1.0/instances/{c1}/state", '{"action": "start"}'
    frozen = lxc("query", "--wait", "-X", "PUT", path, "-d", start, check=False)
    assert frozen.returncode != 0
    assert "The instance is frozen, unfreeze it instead" in frozen.stderr
    assert status() == "Frozen"
    lxc("start", c1)
    assert status() == "Running"
    assert lxc.json("list")[0]["state"]["pid"] == pid


def test_a_stale_record_handed_to_compute_loses_no_change(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """The api hands compute the record it read for a state change. If the record changed
    in between, compute's write fails its revision check and is redone on the newer one:
    the state changes and nothing newer is lost."""
    croft, lxc, _ = croft_lxc

    async def scenario() -> dict:
        store = await croft.connect()
        transport = await rpc.ServiceClient(store, "compute", compute_pb2_grpc.ComputeStub).start()
        client = ComputeClient(transport)
        try:
            key = "/croft/records/instances/default/c1"
            stale, revision = await store.get_json(key)
            lxc("config", "set", c1, "user.after", "kept")  # a newer revision
            stopped = await client.change_state(
                common_pb2.InstanceRef(project="default", name=c1),
                "stop",
                force=True,
                known=(InstanceRecord.model_validate(stale), revision),
                deadline=60,
            )
            assert stopped.status == "Stopped"
            record, _ = await store.get_json(key)
            return record
        finally:
            await transport.close()
            await store.close()

    record = asyncio.run(scenario())
    assert record["status"] == "Stopped"
    assert record["config"]["user.after"] == "kept"
    assert lxc.json("list")[0]["status"] == "Stopped"
    lxc("start", c1)


def test_a_launch_ends_its_operations_in_the_writes_of_the_instance(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """`lxc launch` is two operations (create, start). compute writes each one's end in
    the transaction of the instance's change, so the client hears Success exactly when
    the instance is recorded: the two Success writes share revisions with the record's."""
    croft, lxc, _ = croft_lxc

    async def history(since: int) -> list[tuple[int, str, bytes]]:
        """Every change under /croft/ after `since`, to a marker written after them."""
        store = await croft.connect()
        seen: list[tuple[int, str, bytes]] = []
        try:
            marker = await store.put("/croft/test-marker", b"")
            async for event in store.watch("/croft/", start_revision=since):
                if event.revision >= marker.revision:
                    return seen
                seen.append((event.revision, event.key, event.value))
        finally:
            await store.close()
        return seen

    async def revision() -> int:
        store = await croft.connect()
        try:
            return await store.revision()
        finally:
            await store.close()

    before = asyncio.run(revision())
    lxc("launch", "busybox", "rides")
    seen = asyncio.run(history(before))
    instance = {rev for rev, key, _ in seen if key == "/croft/records/instances/default/rides"}
    ends = {}
    for rev, key, value in seen:
        if key.startswith("/croft/operations/") and value:
            op = json.loads(value)["operation"]
            if op["status"] == "Success":
                ends[op["description"]] = rev
    assert set(ends) == {"Creating instance", "Starting instance"}
    assert set(ends.values()) <= instance, (ends, sorted(instance))
    lxc("delete", "--force", "rides")


def test_lxc_network_lists_and_shows_the_bridge_and_its_users(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    _, lxc, bridge = croft_lxc
    listed = {n["name"]: n for n in lxc.json("network", "list")}
    assert listed[bridge]["managed"] and listed[bridge]["type"] == "bridge"
    assert f"/1.0/instances/{c1}" in listed[bridge]["used_by"]
    shown = yaml.safe_load(lxc("network", "show", bridge).stdout)
    assert shown["config"]["ipv4.address"] == listed[bridge]["config"]["ipv4.address"]
    assert sorted(shown["used_by"]) == sorted(listed[bridge]["used_by"])  # show sorts them


def test_delete_force_leaves_nothing_behind(croft_lxc: tuple[Croft, Lxc, str], c1: str) -> None:
    croft, lxc, bridge = croft_lxc
    lxc("launch", "busybox", "gone")
    record = json.loads(lxc("query", "/1.0/instances/gone").stdout)
    hwaddr = record["config"]["volatile.eth0.hwaddr"]
    wait_until(lambda: ipv4_of(lxc, "gone"), 30, "gone to get a lease")
    host_veths = set(os.listdir(f"/sys/class/net/{bridge}/brif"))

    def network_users() -> list[str]:
        network: dict[str, Any] = json.loads(lxc("query", f"/1.0/networks/{bridge}").stdout)
        users: list[str] = network["used_by"]
        return users

    # As LXD lists it: the profiles with a NIC on the network, then the instances.
    users = network_users()
    assert users.index("/1.0/profiles/default") < users.index("/1.0/instances/gone")
    lxc("delete", "--force", "gone")
    assert "/1.0/instances/gone" not in network_users()
    state = croft.root / "state"
    assert not (state / "storage-pools" / "default" / "containers" / "gone").exists()
    assert not (state / "lxc" / "gone").exists()
    assert set(os.listdir(f"/sys/class/net/{bridge}/brif")) < host_veths
    leases = (state / "networks" / bridge / "dnsmasq.leases").read_text()
    assert hwaddr not in leases
    assert not any(
        p.name.endswith("gone") for p in Path("/sys/fs/cgroup/memory").glob("lxc.payload*")
    )
    assert lxc("query", "/1.0/instances/gone", check=False).returncode != 0


def test_devices_and_config_changed_later_apply_at_the_next_start(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    croft, lxc, bridge = croft_lxc
    lxc("launch", "busybox", "dev1")
    hosts = croft.root / "state" / "networks" / bridge / "dnsmasq.hosts.d"
    shared = croft.root / "shared"  # not pytest's 0700 tmp_path: the container is unprivileged
    shared.mkdir(mode=0o755)
    (shared / "hello").write_text("from the host\n")
    try:
        refused = lxc("config", "device", "add", "dev1", "z", "unix-char", "path=/dev/zero",
                      check=False)  # fmt: skip
        assert "cannot be changed while the instance is running" in refused.stderr

        lxc("stop", "--force", "dev1")
        lxc("config", "device", "add", "dev1", "zero", "unix-char",
            "source=/dev/zero", "path=/dev/myzero")  # fmt: skip
        lxc("config", "device", "add", "dev1", "data", "disk",
            f"source={shared}", "path=/mnt/shared")  # fmt: skip
        lxc("config", "device", "add", "dev1", "eth1", "nic", f"network={bridge}")
        missing = lxc("config", "device", "add", "dev1", "bad", "unix-char",
                      "source=/dev/no-such-device", "path=/dev/bad", check=False)  # fmt: skip
        assert missing.returncode != 0
        assert '"/dev/no-such-device" does not exist' in missing.stderr
        record = json.loads(lxc("query", "/1.0/instances/dev1").stdout)
        assert sorted(record["devices"]) == ["data", "eth1", "zero"]  # the bad one: no trace
        eth1_mac = record["config"]["volatile.eth1.hwaddr"]
        assert (hosts / eth1_mac.replace(":", "-")).exists()  # DHCP knows the new NIC

        lxc("start", "dev1")
        seen = lxc("exec", "dev1", "--", "sh", "-c",
                   "stat -c '%F %t:%T' /dev/myzero; head -c 3 /dev/myzero | od -An -tx1;"
                   " cat /mnt/shared/hello; cat /sys/class/net/eth1/address")  # fmt: skip
        assert seen.stdout.split("\n")[:4] == [
            "character special file 1:5",
            " 00 00 00",
            "from the host",
            eth1_mac,
        ]

        # A config change on a running instance applies at its next start.
        assert "100000" in lxc("exec", "dev1", "--", "cat", "/proc/self/uid_map").stdout
        lxc("config", "set", "dev1", "security.privileged", "true")
        assert "100000" in lxc("exec", "dev1", "--", "cat", "/proc/self/uid_map").stdout
        lxc("restart", "--force", "dev1")
        uid_map = lxc("exec", "dev1", "--", "cat", "/proc/self/uid_map").stdout
        assert uid_map.split() == ["0", "0", "4294967295"]

        lxc("stop", "--force", "dev1")
        lxc("snapshot", "dev1", "with-eth1")
        lxc("config", "device", "remove", "dev1", "eth1")
        record = json.loads(lxc("query", "/1.0/instances/dev1").stdout)
        assert "volatile.eth1.hwaddr" not in record["config"]
        assert not (hosts / eth1_mac.replace(":", "-")).exists()
        lxc("start", "dev1")
        links = lxc("exec", "dev1", "--", "ls", "/sys/class/net").stdout.split()
        assert sorted(links) == ["eth0", "lo"]

        # A restore brings the snapshot's devices back, NIC and MAC included.
        lxc("restore", "dev1", "with-eth1")
        assert (hosts / eth1_mac.replace(":", "-")).exists()
        mac = lxc("exec", "dev1", "--", "cat", "/sys/class/net/eth1/address").stdout.strip()
        assert mac == eth1_mac
    finally:
        lxc("delete", "--force", "dev1", check=False)


def test_a_profile_change_reaches_the_instances_that_use_it(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    _, lxc, _ = croft_lxc
    lxc("profile", "create", "small")
    lxc("profile", "set", "small", "limits.memory", "128MiB")
    try:
        lxc("launch", "busybox", "prof-on", "-p", "default", "-p", "small")
        lxc("init", "busybox", "prof-off", "-p", "default", "-p", "small")

        def memory_limit(name: str) -> str:
            expanded = json.loads(lxc("query", f"/1.0/instances/{name}").stdout)
            return str(expanded["expanded_config"]["limits.memory"])

        # Live on the running instance, recorded on the stopped one.
        lxc("profile", "set", "small", "limits.memory", "100MiB")
        assert memory_limit("prof-on") == memory_limit("prof-off") == "100MiB"
        cgroup = Path("/sys/fs/cgroup/memory/lxc.payload.prof-on/memory.limit_in_bytes")
        assert cgroup.read_text().strip() == str(100 * 1024 * 1024)

        # New devices cannot reach a running user: refused, and the profile is unchanged.
        refused = lxc("profile", "device", "add", "small", "zero", "unix-char",
                      "source=/dev/zero", "path=/dev/pzero", check=False)  # fmt: skip
        assert 'Instance "prof-on" uses the profile and is running' in refused.stderr
        assert json.loads(lxc("query", "/1.0/profiles/small").stdout)["devices"] == {}

        lxc("stop", "--force", "prof-on")
        lxc("profile", "device", "add", "small", "zero", "unix-char",
            "source=/dev/zero", "path=/dev/pzero")  # fmt: skip
        lxc("start", "prof-on", "prof-off")
        for name in ("prof-on", "prof-off"):
            kind = lxc("exec", name, "--", "stat", "-c", "%F %t:%T", "/dev/pzero").stdout
            assert kind == "character special file 1:5\n"
    finally:
        lxc("delete", "--force", "prof-on", "prof-off", check=False)
        lxc("profile", "delete", "small", check=False)


def test_start_templates_render_at_every_start_from_the_config(
    croft_lxc: tuple[Croft, Lxc, str], c1: str, tmp_path: Path
) -> None:
    from croft.imageformat.builder import build_image

    _, lxc, _ = croft_lxc
    definition = yaml.safe_load((REPO / "services/images/definitions/busybox.yaml").read_text())
    definition["properties"]["variant"] = "templated"
    definition["templates"]["/etc/greeting"] = {
        "when": ["start"],
        "template": "greeting.tpl",
        "content": '{{ config_get("user.greeting", "none") }}\n',
    }
    (tmp_path / "templated.yaml").write_text(yaml.safe_dump(definition))
    build_image(tmp_path / "templated.yaml", tmp_path / "templated.tar.gz")
    lxc("image", "import", str(tmp_path / "templated.tar.gz"), "--alias", "templated")
    lxc("launch", "templated", "tpl")
    try:
        assert lxc("exec", "tpl", "--", "cat", "/etc/greeting").stdout == "none\n"
        assert lxc("exec", "tpl", "--", "cat", "/etc/hostname").stdout == "tpl\n"  # create
        lxc("config", "set", "tpl", "user.greeting", "hello")
        lxc("restart", "tpl")
        assert lxc("exec", "tpl", "--", "cat", "/etc/greeting").stdout == "hello\n"
    finally:
        lxc("delete", "--force", "tpl", check=False)


def test_a_container_that_stops_or_starts_on_its_own_is_listed_as_it_is(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """compute's status monitor: a container powered off from inside is listed Stopped,
    and one started behind croft's back Running, after a pass or two (every 5 s); the
    others keep their status."""
    croft, lxc, _ = croft_lxc
    lxc("launch", "busybox", "own1")
    lxcpath = croft.root / "state" / "lxc"

    def status(name: str) -> str:
        (instance,) = [i for i in lxc.json("list") if i["name"] == name]
        return str(instance["status"])

    def power_off() -> None:
        """SIGPWR to init, which exits on it (again if it came before init's trap)."""

        def stopped() -> bool:
            info = ["lxc-info", "-n", "own1", "-P", str(lxcpath), "-s"]
            if "STOPPED" in subprocess.run(info, capture_output=True, text=True).stdout:
                return True
            lxc("exec", "own1", "--", "kill", "-PWR", "1", check=False)
            return False

        wait_until(stopped, 30, "own1 to power off")

    power_off()
    wait_until(lambda: status("own1") == "Stopped", 30, "own1 to be listed Stopped")
    assert status(c1) == "Running"
    subprocess.run(["lxc-start", "-n", "own1", "-P", str(lxcpath)], check=True, timeout=60)
    wait_until(lambda: status("own1") == "Running", 30, "own1 to be listed Running")
    assert status(c1) == "Running"
    # Powered off again, and deleted at once, before a monitor pass is likely: the record
    # still says Running, the client asks for a stop first, and that stop is done already.
    power_off()
    lxc("delete", "--force", "own1")
    assert "own1" not in [i["name"] for i in lxc.json("list")]


def test_server_pools_and_instances_show_what_the_services_report(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """`/1.0` lists the storage drivers the live storage service reports; a standalone
    server shows LXD's "none" as the location of its pool and instances, while the records
    name their member."""
    croft, lxc, _ = croft_lxc
    environment = json.loads(lxc("query", "/1.0").stdout)["environment"]
    assert environment["storage"] == "btrfs | dir"
    assert environment["storage_version"].endswith(" | 1")
    assert environment["storage_supported_drivers"][1] == {
        "Name": "dir",
        "Version": "1",
        "Remote": False,
    }
    assert environment["storage_supported_drivers"][0]["Name"] == "btrfs"

    pool = json.loads(lxc("query", "/1.0/storage-pools/default").stdout)
    assert pool["config"] == {"source": str(croft.root / "state" / "storage-pools" / "default")}
    assert (pool["status"], pool["locations"]) == ("Created", ["none"])
    assert pool["driver"] == "dir" and "/1.0/instances/c1" in pool["used_by"]
    resources = json.loads(lxc("query", "/1.0/storage-pools/default/resources").stdout)
    assert resources["space"]["total"] > 0

    assert json.loads(lxc("query", f"/1.0/instances/{c1}").stdout)["location"] == "none"
    assert lxc.json("list")[0]["location"] == "none"

    async def records() -> tuple[dict[str, Any], dict[str, Any]]:
        store = await croft.connect()
        try:
            instance = await store.get_json(f"/croft/records/instances/default/{c1}")
            pool = await store.get_json("/croft/records/storage-pools/default/default")
            assert instance is not None and pool is not None
            return instance[0], pool[0]
        finally:
            await store.close()

    instance, pool_record = asyncio.run(records())
    member = instance["_croft"]["member"]
    assert instance["location"] == member != "none"
    assert list(pool_record["_croft"]["members"]) == [member]


def test_a_record_from_before_storage_said_where_the_volume_is_still_gets_its_templates(
    croft_lxc: tuple[Croft, Lxc, str], c1: str
) -> None:
    """Compute no longer derives the volume's directory from the rootfs path: storage
    says where it is. A record written before storage said so learns it at its start
    (MountInstanceVolume), and the image's create templates still render."""
    croft, lxc, _ = croft_lxc
    lxc("init", "busybox", "legacy")
    key = "/croft/records/instances/default/legacy"

    async def forget() -> None:
        store = await croft.connect()
        try:
            record, revision = await store.get_json(key)
            assert record["_croft"].pop("volume")
            record["_croft"].pop("instance_mounts")
            await store.update(key, json.dumps(record).encode(), revision=revision)
        finally:
            await store.close()

    async def volume() -> str:
        store = await croft.connect()
        try:
            record, _ = await store.get_json(key)
            return str(record["_croft"].get("volume", ""))
        finally:
            await store.close()

    try:
        asyncio.run(forget())
        lxc("start", "legacy")
        assert lxc("exec", "legacy", "--", "cat", "/etc/hostname").stdout == "legacy\n"
        assert Path(asyncio.run(volume()), "templates").is_dir()
    finally:
        lxc("delete", "--force", "legacy", check=False)


def test_deleting_an_image_deletes_its_unpacked_volume(
    croft_lxc: tuple[Croft, Lxc, str], c1: str, tmp_path: Path
) -> None:
    """`lxc image delete` leaves nothing of the image in the pools: storage follows the
    deletion and removes the image's unpacked volume and its record."""
    from croft.imageformat.builder import build_image

    croft, lxc, _ = croft_lxc
    definition = yaml.safe_load((REPO / "services/images/definitions/busybox.yaml").read_text())
    definition["properties"]["variant"] = "to-delete"
    (tmp_path / "gone.yaml").write_text(yaml.safe_dump(definition))
    fingerprint = build_image(tmp_path / "gone.yaml", tmp_path / "gone.tar.gz").fingerprint
    lxc("image", "import", str(tmp_path / "gone.tar.gz"), "--alias", "to-delete")
    images = croft.root / "state" / "storage-pools" / "default" / "images"
    key = f"/croft/records/storage-volumes/default/default/image/{fingerprint}"

    async def volume_record() -> Any:
        store = await croft.connect()
        try:
            return await store.get_json(key)
        finally:
            await store.close()

    lxc("init", "to-delete", "from-gone")
    try:
        assert (images / fingerprint / "rootfs").is_dir()
        assert asyncio.run(volume_record()) is not None
        lxc("image", "delete", "to-delete")
        wait_until(lambda: not (images / fingerprint).exists(), 30, "the image volume to go")
        wait_until(lambda: asyncio.run(volume_record()) is None, 30, "its record to go")
        # The instance made from it does not depend on it.
        lxc("start", "from-gone")
        assert lxc("exec", "from-gone", "--", "cat", "/etc/hostname").stdout == "from-gone\n"
    finally:
        lxc("delete", "--force", "from-gone", check=False)
