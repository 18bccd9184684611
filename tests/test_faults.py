"""Faults and races through the real `lxc` client (issue 3): concurrent creates of one
name, and services SIGKILLed while containers run or while a create is half-way. After
each, croft must hold either a whole instance or no trace of it: no record, volume, LXC
definition, DHCP host entry or veth left over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from croft.common.store import EventType
from croft.common.testing.waiting import wait_until

from .conftest import Croft, Lxc

INSTANCES = "/croft/records/instances/default/"
VOLUMES = "/croft/records/storage-volumes/default/"
NICS = "/croft/records/network-nics/"
OPERATIONS = "/croft/operations/"


def store_list(croft: Croft, prefix: str) -> list[tuple[str, Any]]:
    async def go() -> list[tuple[str, Any]]:
        store = await croft.connect()
        try:
            return [(e.key, e.json()) for e in await store.list(prefix)]
        finally:
            await store.close()

    return asyncio.run(go())


def traces(croft: Croft, bridge: str, name: str) -> dict[str, int]:
    """Every piece of instance `name` croft could leave behind, counted."""
    state = croft.root / "state"
    pool = state / "storage-pools" / "default" / "containers"
    records = [r for k, r in store_list(croft, INSTANCES) if k == INSTANCES + name]
    volumes = [k for k, _ in store_list(croft, VOLUMES) if k.endswith(f"/container/{name}")]
    nics = [key for key, _ in store_list(croft, NICS) if key.split("/")[-2] == name]
    hosts_dir = state / "networks" / bridge / "dnsmasq.hosts.d"
    hosts = [p.read_text() for p in hosts_dir.iterdir()] if hosts_dir.is_dir() else []
    return {
        "instance records": len(records),
        "complete instance records": sum(
            1 for r in records if r.get("_croft", {}).get("state") == "created"
        ),
        "volume records": len(volumes),
        "volume directories": sum(
            1 for p in pool.iterdir() if p.name == name or p.name.endswith(f"-{name}")
        )
        if pool.is_dir()
        else 0,
        "LXC definitions": int((state / "lxc" / name).exists()),
        "DHCP host entries": sum(1 for line in hosts if line.strip().split(",")[-1] == name),
        "network NIC entries": len(nics),
    }


def nothing_of(croft: Croft, bridge: str, name: str) -> dict[str, int]:
    return {key: 0 for key in traces(croft, bridge, name)}


def one_of(croft: Croft, bridge: str, name: str) -> dict[str, int]:
    return {key: 1 for key in traces(croft, bridge, name)}


def bridge_ports(bridge: str) -> set[str]:
    return set(os.listdir(f"/sys/class/net/{bridge}/brif"))


def init_pid(lxc: Lxc, name: str) -> int:
    return int(json.loads(lxc("query", f"/1.0/instances/{name}/state").stdout)["pid"])


def operation(lxc: Lxc, op_id: str) -> dict[str, Any]:
    result = lxc("query", f"/1.0/operations/{op_id}", check=False)
    assert result.returncode == 0, f"operation {op_id}: {result.stderr}"
    return dict(json.loads(result.stdout))


async def kill_when(
    croft: Croft, prefix: str, wanted: Callable[[str, dict[str, Any]], bool], pid: int
) -> str:
    """Follow the store from now; at the first write under `prefix` that `wanted` accepts,
    SIGKILL `pid`. Returns the key written."""
    store = await croft.connect()
    try:
        revision = await store.revision()
        async for event in store.watch(prefix, start_revision=revision):
            if event.type is EventType.PUT and wanted(event.key, json.loads(event.value)):
                os.kill(pid, signal.SIGKILL)
                return event.key
    finally:
        await store.close()
    raise AssertionError("the watch ended")


async def launch_and_kill(
    croft: Croft,
    lxc: Lxc,
    name: str,
    prefix: str,
    wanted: Callable[[str, dict[str, Any]], bool],
    pid: int,
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`lxc launch busybox <name>`, and SIGKILL `pid` at the first matching store write."""
    killer = asyncio.create_task(kill_when(croft, prefix, wanted, pid))
    await asyncio.sleep(0.3)  # the watch is set up from the revision taken above anyway
    launch = await asyncio.create_subprocess_exec(
        "lxc", "launch", "busybox", name, env=lxc.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    key = await asyncio.wait_for(killer, 60)
    out, err = await asyncio.wait_for(launch.communicate(), 120)
    assert launch.returncode is not None
    return key, subprocess.CompletedProcess(
        ["lxc", "launch"], launch.returncode, out.decode(), err.decode()
    )


@pytest.fixture(scope="module")
def croft_busybox(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> tuple[Croft, Lxc, str]:
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    return croft_lxc


def test_twenty_concurrent_creates_of_one_name_make_exactly_one_instance(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    croft, lxc, bridge = croft_busybox
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: lxc("init", "busybox", "same", check=False), range(20)))
    succeeded = [r for r in results if r.returncode == 0]
    failed = [r for r in results if r.returncode != 0]
    assert len(succeeded) == 1, [r.stderr for r in results]
    for result in failed:
        assert 'Instance "same" already exists' in result.stderr, result.stderr
    assert traces(croft, bridge, "same") == one_of(croft, bridge, "same")
    assert [i["name"] for i in lxc.json("list")].count("same") == 1
    # and the one that exists is whole: it starts and runs
    lxc("start", "same")
    assert lxc("exec", "same", "--", "true", check=False).returncode == 0
    lxc("delete", "--force", "same")
    assert traces(croft, bridge, "same") == nothing_of(croft, bridge, "same")


def test_sigkill_compute_leaves_containers_running_and_exec_comes_back(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    croft, lxc, _ = croft_busybox
    lxc("launch", "busybox", "c1")
    pid = init_pid(lxc, "c1")
    compute = croft.serving_pid("compute")
    assert compute
    os.kill(compute, signal.SIGKILL)
    killed = time.monotonic()
    assert Path(f"/proc/{pid}").exists()  # the container does not depend on compute

    def exec_works() -> bool:
        return lxc("exec", "c1", "--", "true", check=False, timeout=30).returncode == 0

    wait_until(exec_works, 60, "lxc exec c1 to work after compute was SIGKILLed")
    print(f"lxc exec works {time.monotonic() - killed:.2f}s after compute's SIGKILL")
    assert croft.serving_pid("compute", other_than=compute)  # the agent restarted it
    assert init_pid(lxc, "c1") == pid
    (c1,) = [i for i in lxc.json("list") if i["name"] == "c1"]
    assert c1["status"] == "Running"
    assert lxc("exec", "c1", "--", "sh", "-c", "echo $((6*7))").stdout == "42\n"


def test_after_a_host_restart_compute_starts_what_boot_autostart_asks_for(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    """A host restart, as compute sees it: its containers stopped while it was not
    looking, then compute starting afresh. Like LXD, it starts boot.autostart=true ones
    (in any of LXD's spellings of true) and, with the key unset, the ones that were
    running; boot.autostart=false (or off) stays off."""
    croft, lxc, _ = croft_busybox
    lxcpath = croft.root / "state" / "lxc"
    launch_options = {
        "auto-on": ["-c", "boot.autostart=true"],
        "auto-one": ["-c", "boot.autostart=1"],
        "auto-off": ["-c", "boot.autostart=false"],
        "auto-no": ["-c", "boot.autostart=off"],
        "auto-unset": [],
    }
    names = list(launch_options)

    def status(name: str) -> str | None:
        result = lxc("query", f"/1.0/instances/{name}/state", check=False)
        return json.loads(result.stdout)["status"] if result.returncode == 0 else None

    try:
        for name in names:
            lxc("launch", "busybox", name, *launch_options[name])
        before = {name: init_pid(lxc, name) for name in names}
        assert {p.name for p in lxcpath.iterdir()} >= set(names)  # project default: no prefix
        compute = croft.serving_pid("compute")
        assert compute
        os.kill(compute, signal.SIGSTOP)  # it must not see the containers stop
        try:
            for name in names:
                subprocess.run(
                    ["lxc-stop", "-n", name, "-P", str(lxcpath), "-k"], check=True, timeout=60
                )
                info = subprocess.run(
                    ["lxc-info", "-n", name, "-P", str(lxcpath), "-s"],
                    capture_output=True, text=True, check=True, timeout=60,
                )  # fmt: skip
                assert "STOPPED" in info.stdout, info.stdout
        finally:
            os.kill(compute, signal.SIGKILL)  # kills a stopped process too
        wait_until(lambda: croft.serving_pid("compute", other_than=compute), 60, "compute back")

        for name in ["auto-on", "auto-one", "auto-unset"]:
            wait_until(lambda name=name: status(name) == "Running", 60, f"{name} to be started")
            assert init_pid(lxc, name) not in (0, before[name])
        assert status("auto-off") == "Stopped"
        listed = {i["name"]: i["status"] for i in lxc.json("list") if i["name"] in names}
        assert listed == {
            "auto-on": "Running",
            "auto-one": "Running",
            "auto-off": "Stopped",
            "auto-no": "Stopped",
            "auto-unset": "Running",
        }
        assert lxc("exec", "auto-on", "--", "true", check=False).returncode == 0
    finally:
        for name in names:
            lxc("delete", "--force", name, check=False)


def test_sigkill_compute_half_way_through_a_rename_puts_everything_back(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    """compute dies once the volume moved to the new name: at its restart it moves every
    piece back under the old name."""
    croft, lxc, bridge = croft_busybox
    lxc("init", "busybox", "rnk1")
    lxc("snapshot", "rnk1", "s1")
    before = traces(croft, bridge, "rnk1")
    compute = croft.serving_pid("compute")
    assert compute

    async def rename_and_kill() -> subprocess.CompletedProcess[str]:
        killer = asyncio.create_task(
            kill_when(croft, VOLUMES, lambda key, _: key.endswith("/container/rnk2"), compute)
        )
        await asyncio.sleep(0.3)
        rename = await asyncio.create_subprocess_exec(
            "lxc", "rename", "rnk1", "rnk2", env=lxc.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(killer, 60)
        out, err = await asyncio.wait_for(rename.communicate(), 120)
        assert rename.returncode is not None
        return subprocess.CompletedProcess([], rename.returncode, out.decode(), err.decode())

    result = asyncio.run(rename_and_kill())
    wait_until(lambda: croft.serving_pid("compute", other_than=compute), 60, "compute back")
    if result.returncode == 0:
        # On a busy machine the kill can land after the rename was recorded whole: then
        # the client was told it is done, and everything is under the new name.
        assert traces(croft, bridge, "rnk2") == before
        assert traces(croft, bridge, "rnk1") == nothing_of(croft, bridge, "rnk1")
        snapshots = json.loads(lxc("query", "/1.0/instances/rnk2/snapshots").stdout)
        assert snapshots == ["/1.0/instances/rnk2/snapshots/s1"]
        lxc("delete", "--force", "rnk2")
        return

    def put_back() -> bool:
        found = [r for k, r in store_list(croft, INSTANCES) if k == INSTANCES + "rnk1"]
        return bool(found) and "renaming" not in found[0]["_croft"]

    wait_until(put_back, 60, "the half-made rename to be undone")
    assert traces(croft, bridge, "rnk2") == nothing_of(croft, bridge, "rnk2")
    assert traces(croft, bridge, "rnk1") == before
    snapshots = json.loads(lxc("query", "/1.0/instances/rnk1/snapshots").stdout)
    assert snapshots == ["/1.0/instances/rnk1/snapshots/s1"]
    lxc("start", "rnk1")
    assert lxc("exec", "rnk1", "--", "true", check=False).returncode == 0
    lxc("delete", "--force", "rnk1")
    assert traces(croft, bridge, "rnk1") == nothing_of(croft, bridge, "rnk1")


def store_revision(croft: Croft) -> int:
    async def go() -> int:
        store = await croft.connect()
        try:
            return await store.revision()
        finally:
            await store.close()

    return asyncio.run(go())


def _ended_in_store(croft: Croft, op_id: str, since: int) -> dict[str, Any] | None:
    """The final state operation `op_id` was written with, from the store's history since
    revision `since` (it is deleted a few seconds after it ends)."""

    async def go() -> dict[str, Any] | None:
        store = await croft.connect()
        try:
            async for event in store.watch(OPERATIONS + op_id, start_revision=since):
                if event.type is EventType.PUT:
                    op = json.loads(event.value)["operation"]
                    if op["status"] in ("Success", "Failure"):
                        return dict(op)
        finally:
            await store.close()
        return None

    async def bounded() -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(go(), 10)
        except TimeoutError:
            return None

    return asyncio.run(bounded())


def _final_operation(lxc: Lxc, op_id: str, croft: Croft, since: int) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        result = lxc("query", f"/1.0/operations/{op_id}", check=False)
        if result.returncode != 0:
            if "not found" in result.stderr.lower():
                # It ended and was deleted (a few seconds after its end) before the
                # restarted api answered, which on a busy machine can take that long.
                return _ended_in_store(croft, op_id, since)
            return None  # the api is not back yet
        op = json.loads(result.stdout)
        return op if op["status"] in ("Success", "Failure") else None

    return dict(wait_until(final, 60, f"operation {op_id} to be reported failed or done"))


def _whole_or_nothing(croft: Croft, lxc: Lxc, bridge: str, name: str, op: dict[str, Any]) -> None:
    if op["status"] == "Success":
        assert traces(croft, bridge, name) == one_of(croft, bridge, name)
        assert [i["name"] for i in lxc.json("list")].count(name) == 1
    else:
        assert traces(croft, bridge, name) == nothing_of(croft, bridge, name)
        assert name not in [i["name"] for i in lxc.json("list")]


Moment = tuple[Callable[[str], str], Callable[[str, str, dict[str, Any]], bool]]

# Points in a create, in order, each seen as a write in the store: (the prefix to watch
# for instance `name`, whether a write under it is the one).
MOMENTS: dict[str, Moment] = {
    # the api has recorded the operation; compute may not have been called yet
    "operation recorded": (
        lambda name: OPERATIONS,
        lambda name, key, record: record["operation"]["description"] == "Creating instance",
    ),
    # compute has claimed the name: the half-made record (state "creating")
    "instance record written": (
        lambda name: INSTANCES + name,
        lambda name, key, record: record.get("_croft", {}).get("state") == "creating",
    ),
    # storage has made the volume and written its record (compute has yet to hear of it)
    "volume recorded": (
        lambda name: VOLUMES,
        lambda name, key, record: key.endswith(f"/container/{name}"),
    ),
    # the volume is made, and the network has the NIC's DHCP host entry
    "DHCP entry written": (
        lambda name: NICS,
        lambda name, key, record: key.split("/")[-2] == name,
    ),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_api_in_the_middle_of_a_create_leaves_all_or_nothing(
    croft_busybox: tuple[Croft, Lxc, str], moment: str
) -> None:
    """`lxc launch`, and the api SIGKILLed at `moment` of the create: compute's call is
    cancelled half-way. The restarted api reports the operation failed (or done), and
    croft holds the whole instance (done) or nothing of it (failed)."""
    croft, lxc, bridge = croft_busybox
    name = f"apikill{list(MOMENTS).index(moment)}"
    api = croft.serving_pid("api")
    assert api
    ports = bridge_ports(bridge)
    prefix, wanted = MOMENTS[moment]
    ops_before = {k for k, _ in store_list(croft, OPERATIONS)}
    since = store_revision(croft)
    _, launch = asyncio.run(
        launch_and_kill(croft, lxc, name, prefix(name), partial(wanted, name), api)
    )
    assert launch.returncode != 0  # its api went away under it
    (op_key,) = [
        k
        for k, r in store_list(croft, OPERATIONS)
        if k not in ops_before and r["operation"]["description"] == "Creating instance"
    ]
    wait_until(lambda: croft.serving_pid("api", other_than=api), 60, "the api to restart")
    op = _final_operation(lxc, op_key[len(OPERATIONS) :], croft, since)
    print(f"api killed at {moment}: operation {op['status']} ({op['err']})")
    _whole_or_nothing(croft, lxc, bridge, name, op)
    # No new veth: nothing was started. (One of an instance deleted just before may go
    # meanwhile: the kernel removes a dead network namespace's veths lazily.)
    assert bridge_ports(bridge) <= ports
    if op["status"] == "Success":
        lxc("delete", "--force", name)


# compute's moments: the create's, and just after it was recorded whole (which is where a
# kill meant for the moment before lands when the machine is busy).
COMPUTE_MOMENTS: dict[str, Moment] = {
    **{m: MOMENTS[m] for m in MOMENTS if m != "operation recorded"},
    "instance recorded whole": (
        lambda name: INSTANCES + name,
        lambda name, key, record: record.get("_croft", {}).get("state") == "created",
    ),
}


def _hook_sleeping(marker: str) -> bool:
    """Whether a process runs with `marker` in its command line (the start's hook)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    return True
    return False


def test_sigkill_compute_during_a_start_still_starts_the_instance(
    croft_busybox: tuple[Croft, Lxc, str],
) -> None:
    """compute SIGKILLed while a start is under way (a pre-start hook holds it there):
    the reply is lost, not the start. Once compute is back, the operation says what the
    instance is: started, by the start that was under way or by the same start made
    again on the restarted compute; `lxc start` succeeds, as it would have without the
    kill."""
    croft, lxc, _ = croft_busybox
    name = "startkill"
    marker = "sleep\x004.0271"  # an odd duration: no other sleep has it
    # LXC appends its own arguments to a hook's command: sh takes them as $0...
    hook = "lxc.hook.pre-start = sh -c 'sleep 4.0271'"
    lxc("init", "busybox", name, "-c", f"raw.lxc={hook}")
    try:
        compute = croft.serving_pid("compute")
        assert compute
        start = subprocess.Popen(
            ["lxc", "start", name], env=lxc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        wait_until(lambda: _hook_sleeping(marker), 30, "the start's hook to run")
        os.kill(compute, signal.SIGKILL)
        _, stderr = start.communicate(timeout=180)
        assert start.returncode == 0, stderr.decode()
        wait_until(lambda: croft.serving_pid("compute", other_than=compute), 60, "compute back")
        (listed,) = [i for i in lxc.json("list") if i["name"] == name]
        assert listed["status"] == "Running"
        assert lxc("exec", name, "--", "true", check=False).returncode == 0
    finally:
        lxc("delete", "--force", name, check=False)


@pytest.mark.parametrize("moment", list(COMPUTE_MOMENTS))
def test_sigkill_compute_in_the_middle_of_a_create_leaves_all_or_nothing(
    croft_busybox: tuple[Croft, Lxc, str], moment: str
) -> None:
    """`lxc launch`, and compute SIGKILLed at `moment` of its create. What the client was
    told is what remains: a failed create leaves nothing once the restarted compute's
    reconcile has removed the half-made instance; a create recorded whole (before the
    kill landed, as it does late on a busy machine) is a whole instance, and the start
    that follows succeeds on the restarted compute, so the launch succeeds."""
    croft, lxc, bridge = croft_busybox
    name = f"cmpkill{list(COMPUTE_MOMENTS).index(moment) + 1}"
    compute = croft.serving_pid("compute")
    assert compute
    ports = bridge_ports(bridge)
    prefix, wanted = COMPUTE_MOMENTS[moment]
    _, launch = asyncio.run(
        launch_and_kill(croft, lxc, name, prefix(name), partial(wanted, name), compute)
    )
    wait_until(lambda: croft.serving_pid("compute", other_than=compute), 60, "compute to restart")
    print(f"compute killed at {moment}: lxc launch exited {launch.returncode}: {launch.stdout}")
    print(launch.stderr)
    # `lxc launch` is two operations: "Starting" is printed once the create succeeded.
    created = launch.returncode == 0 or f"Starting {name}" in launch.stdout
    if moment == "instance recorded whole":
        assert created, launch.stderr
    if created:
        # The create went in: the start that follows succeeds too, even when compute died
        # under it (its lost reply is checked against the restarted compute, and a start
        # that did not happen is made then), so the launch as a whole succeeded.
        assert launch.returncode == 0, launch.stderr
        assert traces(croft, bridge, name) == one_of(croft, bridge, name)
        (listed,) = [i for i in lxc.json("list") if i["name"] == name]
        assert listed["status"] == "Running"
        assert lxc("exec", name, "--", "true", check=False).returncode == 0
        lxc("delete", "--force", name)
        assert traces(croft, bridge, name) == nothing_of(croft, bridge, name)
        assert bridge_ports(bridge) <= ports
        return
    with contextlib.suppress(AssertionError):  # the assertion below shows what is left
        wait_until(
            lambda: traces(croft, bridge, name) == nothing_of(croft, bridge, name), 60, "cleanup"
        )
    assert traces(croft, bridge, name) == nothing_of(croft, bridge, name)
    assert name not in [i["name"] for i in lxc.json("list")]
    assert bridge_ports(bridge) <= ports
    # and the name is free again, at once
    lxc("launch", "busybox", name)
    assert lxc("exec", name, "--", "true", check=False).returncode == 0
    lxc("delete", "--force", name)
