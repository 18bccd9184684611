# ruff: noqa: ASYNC221, ASYNC240
# (tests inspect the host directly: blocking reads there are the point)
"""Fixtures for the LXC driver tests: a busybox rootfs, a driver on a private lxcpath, a
test bridge. Everything is named crtst-lxc-* / crtlxcbr0 and removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

TEST_ROOT = Path("/tmp/croft-lxc-test")
BRIDGE = "crtlxcbr0"

INIT = """#!/bin/sh
# croft's test init: bring up lo, say so on the console, wait; LXC's clean stop sends
# SIGPWR, which ends it.
trap 'exit 0' PWR TERM INT
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
ip link set lo up 2>/dev/null
echo "croft test init up"
while :; do
  sleep 86400 &
  wait $!
done
"""


def build_busybox_rootfs(root: Path) -> None:
    """A minimal system from Debian's static busybox: applet symlinks + a tiny init."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static is not installed")
    for sub in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "mnt",
                "usr/bin", "usr/sbin", "var/log"):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = root / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    init = root / "sbin/init"
    init.unlink(missing_ok=True)
    init.write_text(INIT)
    init.chmod(0o755)
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/hostname").write_text("busybox\n")


@pytest.fixture(scope="session")
def busybox_template() -> Iterator[Path]:
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    template = TEST_ROOT / f"template-{os.getpid()}"
    shutil.rmtree(template, ignore_errors=True)
    build_busybox_rootfs(template)
    yield template
    shutil.rmtree(template, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = TEST_ROOT / f"run-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_rootfs(busybox_template: Path, workdir: Path):  # type: ignore[no-untyped-def]
    """A fresh copy of the busybox rootfs, owned by host root (as the storage service
    leaves it: unshifted)."""

    def make(name: str) -> str:
        target = workdir / "rootfs" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(busybox_template), str(target)], check=True)
        return str(target)

    return make


def container_name() -> str:
    return f"crtst-lxc-{uuid.uuid4().hex[:8]}"


async def remove_all(driver: Any) -> None:
    """Stop and delete every instance of `driver` (a test's leftovers), whatever fails."""
    for name in await driver.list():
        with contextlib.suppress(Exception):
            await driver.stop(name, force=True)
        with contextlib.suppress(Exception):
            await driver.delete(name)


@pytest.fixture
async def driver(workdir: Path) -> AsyncIterator[object]:
    from croft.compute.drivers.lxc import LXCDriver

    lxcpath = str(workdir / "lxc")
    drv = LXCDriver(lxcpath)
    yield drv
    await remove_all(drv)
    # Anything liblxc could not stop: kill it by its monitor so no container leaks.
    for name in os.listdir(lxcpath) if os.path.isdir(lxcpath) else []:
        subprocess.run(["lxc-stop", "-k", "-n", name, "-P", lxcpath], capture_output=True)


@pytest.fixture
def bridge() -> Iterator[str]:
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    yield BRIDGE
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


async def read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    """Read from a blocking fd (pipe or pty master) until `needle` shows up."""
    loop = asyncio.get_running_loop()
    buffer = b""

    def read_some() -> bytes:
        try:
            return os.read(fd, 65536)
        except OSError:  # EIO on a pty master once the other side is closed
            return b""

    async def loop_reads() -> bytes:
        nonlocal buffer
        while needle not in buffer:
            chunk = await loop.run_in_executor(None, read_some)
            if not chunk:
                break
            buffer += chunk
        return buffer

    return await asyncio.wait_for(loop_reads(), timeout)
