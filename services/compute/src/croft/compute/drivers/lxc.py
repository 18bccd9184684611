"""LXC containers through liblxc (python3-lxc) and LXC's small C tools.

Choices, each measured on the dev machine (busybox, 2 cores, cgroup v1):
- start runs `lxc-start` (daemonizes; its monitor is a fork of a small C program:
  1.6 MiB PSS). python-lxc's start() forks the calling Python process as the monitor:
  56 MiB PSS with a 100 MiB service. Either way the container outlives the caller.
- exec runs `lxc-attach` (6.9 ms median for `true`); python-lxc's attach() forks the
  whole service (8.0 ms with 100 MiB RSS) and cannot set up a pty in the container.
- stop/freeze/state use python-lxc (command socket to the monitor, no fork).
- Debian's lxcfs adds two hooks to every container: a post-stop one that sleeps 0.5 s,
  and a mount one, a shell script that runs ~20 processes (basename, mount...) at every
  start. The generated config drops both and bind-mounts lxcfs's files itself, as LXD
  does, when lxcfs runs.
- Files go through openat2(RESOLVE_IN_ROOT) on the container's root (/proc/PID/root when
  running, the rootfs when stopped), so no symlink can lead out of the container.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import hashlib
import logging
import math
import os
import posixpath
import re
import secrets
import shutil
import signal
import stat
import struct
import sys
import tempfile
import termios
import time
import tty
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import lxc

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, Internal, InvalidArgument, NotFound
from croft.common.instance_config import InstanceConfig, go_quote, parse_bool
from croft.common.proc import run, run_async
from croft.compute import limits as limits_mod
from croft.compute.drivers import (
    Capabilities,
    ExecCommand,
    ExecProcess,
    FileEntry,
    IdMap,
    InstanceDriver,
    InstanceSpec,
    InstanceState,
    NetworkInterface,
    Status,
    netns,
)

log = logging.getLogger(__name__)

# A definition being written (`LXCDriver.create`), hidden until it is whole; one older than
# _PARTIAL_AGE seconds is a dead process's.
_PARTIAL = ".partial-"
_PARTIAL_AGE = 60.0

COMMON_CONF = "/usr/share/lxc/config/common.conf"
USERNS_CONF = "/usr/share/lxc/config/userns.conf"
NESTING_CONF = "/usr/share/lxc/config/nesting.conf"
# Spawned per exec: resolved once, not searched along PATH every time.
_LXC_ATTACH = shutil.which("lxc-attach") or "lxc-attach"
_LXC_START = shutil.which("lxc-start") or "lxc-start"
# Attaches its pty to the console of container argv[1] (lxcpath argv[2]), as LXD's
# `forkconsole` does: liblxc's lxc_console() on tty 0, with no escape key (the client
# detaches; then this process is killed).
_CONSOLE_HELPER = (
    "import sys, lxc; "
    "ok = lxc.Container(sys.argv[1], sys.argv[2]).console("
    "ttynum=0, stdinfd=0, stdoutfd=1, stderrfd=2, escape=0); "
    "sys.exit(0 if ok else 1)"
)

# lxc-start's environment. With newuidmap and newgidmap on its PATH, liblxc runs them
# (each through `sh -c`) to write the container's id maps, four processes per start;
# without them, as root, it writes the maps itself. The container's init gets a cleared
# environment either way. A definition with hooks (raw.lxc) keeps the usual PATH: its
# hook scripts may call anything.
_LXC_START_ENV = {"PATH": "/usr/sbin:/sbin", "LANG": "C.UTF-8"}


@functools.cache
def _cgroup_hierarchies() -> tuple[str, ...]:
    """The mounted cgroup hierarchies (v1 controllers and the v2 one); the host mounts
    them at boot, so they are listed once per process."""
    try:
        entries = os.listdir("/sys/fs/cgroup")
    except OSError:
        return ()
    return tuple(
        path
        for path in (os.path.join("/sys/fs/cgroup", e) for e in entries)
        if os.path.isdir(path) and not os.path.islink(path)
    )


# LXD's fallback when root has no /etc/subuid entry.
FALLBACK_IDMAP = IdMap(host_base=1_000_000, size=65536)
# Instance names plus LXD's "<project>_" prefix; nothing that could be a path.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_CGROUP_V1 = os.path.isdir("/sys/fs/cgroup/memory")
_LIMIT_CGROUP_KEYS = {
    "memory.limit_in_bytes",
    "pids.max",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
    "cpuset.cpus",
    "memory.max",
    "cpu.max",
}
# liblxc state -> LXD status, as LXD's lxcStatusCode maps them.
_STATUS = {
    "STOPPED": Status.STOPPED,
    "STARTING": Status.RUNNING,
    "RUNNING": Status.RUNNING,
    "STOPPING": Status.RUNNING,
    "ABORTING": Status.ERROR,
    "FREEZING": Status.RUNNING,
    "FROZEN": Status.FROZEN,
    "THAWED": Status.RUNNING,
}


def cgroup_value(container: lxc.Container, key: str) -> str:
    """A cgroup file of a running container, "" when it has none. liblxc reads a value in
    two calls, its size and then the value, and the binding raises ValueError when the size
    changed in between: a counter that gained a digit. Read it again then."""
    for _ in range(8):
        try:
            return str(container.get_cgroup_item(key) or "").strip()
        except ValueError:
            continue
    return ""


def default_idmap(subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> IdMap:
    """65536 ids at the start of root's subordinate range (LXD's default shared map)."""

    def root_range(path: str) -> tuple[int, int] | None:
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in ("root", "0"):
                    return int(parts[1]), int(parts[2])
        return None

    uid_range, gid_range = root_range(subuid), root_range(subgid)
    if uid_range is None or gid_range is None:
        return FALLBACK_IDMAP
    if uid_range[0] != gid_range[0] or min(uid_range[1], gid_range[1]) < 65536:
        raise Internal(
            f"root's ranges in {subuid} and {subgid} must start at the same id and hold "
            "at least 65536 ids"
        )
    return IdMap(host_base=uid_range[0], size=65536)


def validate_name(name: str) -> None:
    if not _NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f'Invalid instance name "{name}": letters, digits, "-", "_", "." and "+", '
            "starting with a letter or digit"
        )


def _veth_name(instance: str, device: str) -> str:
    # Stable across restarts and unique per (instance, device); 15 chars max for ifnames.
    import hashlib

    return "veth" + hashlib.sha256(f"{instance}/{device}".encode()).hexdigest()[:8]


def _plug_veth(pid: int, host: str, inside: str, nic: dict[str, str]) -> None:
    """A veth pair: `host` on the NIC's bridge (up), its peer in the network namespace of
    process `pid` as `inside`, with the NIC's MAC and MTU. Removed again on failure."""
    peer = "tmp" + hashlib.sha256(host.encode()).hexdigest()[:8]
    mtu = ["mtu", nic["mtu"]] if nic.get("mtu") else []
    run(["ip", "link", "add", host, *mtu, "type", "veth", "peer", "name", peer, *mtu])
    try:
        if nic.get("hwaddr"):
            run(["ip", "link", "set", peer, "address", nic["hwaddr"]])
        run(["ip", "link", "set", host, "master", nic["parent"], "up"])
        run(["ip", "link", "set", peer, "netns", str(pid)])
        inside_ns = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "set", peer]
        run([*inside_ns, "name", inside])
        run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "set", inside, "up"])
    except BaseException:
        run(["ip", "link", "del", host], check=False)
        raise


def _nic_lines(index: int, instance: str, device: str, nic: dict[str, str]) -> list[str]:
    prefix = f"lxc.net.{index}"
    nictype = nic.get("nictype", "")
    parent = nic.get("parent", "")
    if not nictype and nic.get("network"):
        # The network's driver decides how its NICs are plugged (compute asks it at
        # attach and fills in nictype and parent): never guess it here.
        raise InvalidArgument(f'Device "{device}": network "{nic["network"]}" gave no nictype')
    if nictype in ("bridged", "macvlan", "physical") and not parent:
        raise InvalidArgument(f'Device "{device}": a {nictype} nic needs "parent"')
    if nictype == "bridged":
        lines = [f"{prefix}.type = veth", f"{prefix}.link = {parent}"]
        lines.append(f"{prefix}.veth.pair = {nic.get('host_name') or _veth_name(instance, device)}")
    elif nictype == "p2p":
        lines = [f"{prefix}.type = veth"]
        lines.append(f"{prefix}.veth.pair = {nic.get('host_name') or _veth_name(instance, device)}")
    elif nictype == "macvlan":
        lines = [f"{prefix}.type = macvlan", f"{prefix}.link = {parent}"]
        lines.append(f"{prefix}.macvlan.mode = bridge")
    elif nictype == "physical":
        lines = [f"{prefix}.type = phys", f"{prefix}.link = {parent}"]
    else:
        raise InvalidArgument(f'Device "{device}": unsupported nic type "{nictype or "?"}"')
    lines.append(f"{prefix}.flags = up")
    lines.append(f"{prefix}.name = {nic.get('name') or device}")
    hwaddr = nic.get("hwaddr", "")  # LXD's key for a NIC's MAC address
    if hwaddr:
        if not re.match(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", hwaddr):
            raise InvalidArgument(f'Device "{device}": invalid hwaddr "{hwaddr}"')
        lines.append(f"{prefix}.hwaddr = {hwaddr}")
    if nic.get("mtu"):
        if not nic["mtu"].isdigit():
            raise InvalidArgument(f'Device "{device}": invalid mtu "{nic["mtu"]}"')
        lines.append(f"{prefix}.mtu = {nic['mtu']}")
    return lines


def _bridge_ports(lines: list[str]) -> list[str]:
    """The host-side veths of a definition's bridged NICs (a veth pair with a link)."""
    pairs: dict[str, str] = {}
    linked: set[str] = set()
    for line in lines:
        key, sep, value = line.partition("=")
        found = re.match(r"^lxc\.net\.(\d+)\.(veth\.pair|link)$", key.strip()) if sep else None
        if found is None:
            continue
        if found.group(2) == "link":
            linked.add(found.group(1))
        else:
            pairs[found.group(1)] = value.strip()
    return [veth for index, veth in sorted(pairs.items()) if index in linked]


def _no_ipv6_of_its_own(veth: str) -> None:
    """Turn IPv6 off on the host side of a bridged NIC, as LXD does. The port only carries
    the container's traffic into the bridge (the container's own IPv6 is untouched). An
    address of its own would add duplicate address detection and multicast listener
    reports, which the bridge floods to every container."""
    for key, value in (("disable_ipv6", "1"), ("accept_ra", "0")):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{veth}/{key}", "w") as knob:
                knob.write(value)
        except FileNotFoundError:
            return  # no IPv6 on this host, or the container stopped already
        except OSError as exc:
            log.warning("could not set %s on %s: %s", key, veth, exc)


def _mount_target(device: str, path: str) -> str:
    normalized = posixpath.normpath("/" + path)
    if normalized == "/" or ".." in normalized.split("/"):
        raise InvalidArgument(f'Device "{device}": invalid path "{path}"')
    return normalized.lstrip("/")


def _device_flag(device: str, dev: dict[str, str], option: str) -> bool:
    """A boolean device option (unset is false), read as LXD reads booleans."""
    try:
        return parse_bool(dev.get(option) or "false")
    except ValueError as exc:
        raise InvalidArgument(f'Device "{device}": {option}: {exc}') from None


def _device_lines(
    spec: InstanceSpec, device: str, dev: dict[str, str], cgroup_prefix: str
) -> list[str]:
    kind = dev.get("type", "")
    if kind == "disk":
        if dev.get("path") == "/":
            return []  # the root disk is spec.rootfs
        source, path = dev.get("source", ""), dev.get("path", "")
        if not source or not path:
            raise InvalidArgument(f'Device "{device}": a disk needs "source" and "path"')
        if not os.path.exists(source):
            raise InvalidArgument(f'Device "{device}": source "{source}" does not exist')
        options = ["bind", "create=dir" if os.path.isdir(source) else "create=file"]
        if _device_flag(device, dev, "readonly"):
            options.append("ro")
        if not spec.privileged:
            options.append("idmap=container")  # host-owned source, seen unshifted inside
        target = _mount_target(device, path)
        return [f"lxc.mount.entry = {source} {target} none {','.join(options)} 0 0"]
    if kind in ("unix-char", "unix-block"):
        source = dev.get("source") or dev.get("path", "")
        path = dev.get("path") or source
        try:
            st = os.stat(source)
        except OSError:
            raise InvalidArgument(f'Device "{device}": "{source}" does not exist') from None
        want = stat.S_ISCHR if kind == "unix-char" else stat.S_ISBLK
        if not want(st.st_mode):
            raise InvalidArgument(f'Device "{device}": "{source}" is not a {kind} device')
        letter = "c" if kind == "unix-char" else "b"
        target = _mount_target(device, path)
        return [
            f"{cgroup_prefix}.devices.allow = {letter} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} rwm",
            f"lxc.mount.entry = {source} {target} none bind,create=file 0 0",
        ]
    if kind in ("none", ""):
        return []
    raise InvalidArgument(f'Device "{device}": unsupported device type "{kind}"')


LXCFS_DIR = "/var/lib/lxcfs"
# The files LXD 5.0 bind-mounts from lxcfs over the container's /proc.
LXCFS_PROC_FILES = (
    "cpuinfo",
    "diskstats",
    "loadavg",
    "meminfo",
    "slabinfo",
    "stat",
    "swaps",
    "uptime",
)


def lxcfs_lines(lxcfs_dir: str) -> list[str]:
    """Mount entries for lxcfs's view of /proc and of the CPUs (the container's own
    memory, CPU and uptime figures), when lxcfs serves `lxcfs_dir`; none otherwise."""
    if not os.path.isfile(os.path.join(lxcfs_dir, "proc", "meminfo")):
        return []
    lines = [
        f"lxc.mount.entry = {lxcfs_dir}/proc/{name} proc/{name} none bind,optional 0 0"
        for name in LXCFS_PROC_FILES
        if os.path.exists(os.path.join(lxcfs_dir, "proc", name))
    ]
    cpus = os.path.join(lxcfs_dir, "sys", "devices", "system", "cpu")
    if os.path.isdir(cpus):
        lines.append(f"lxc.mount.entry = {cpus} sys/devices/system/cpu none bind,optional 0 0")
    return lines


def render_config(
    spec: InstanceSpec, lxcpath: str, idmap: IdMap, lxcfs_dir: str = LXCFS_DIR
) -> str:
    """The LXC configuration file for `spec` (raises InvalidArgument for a bad spec)."""
    validate_name(spec.name)
    cgroup_prefix = "lxc.cgroup" if _CGROUP_V1 else "lxc.cgroup2"
    parsed = limits_mod.parse_limits(spec.config)
    directory = os.path.join(lxcpath, spec.name)
    lines = [
        "# Written by croft from the instance's record, again whenever its config changes.",
        f"lxc.include = {COMMON_CONF}",
    ]
    if not spec.privileged:
        lines.append(f"lxc.include = {USERNS_CONF}")
    if InstanceConfig(spec.config).bool("security.nesting"):
        lines.append(f"lxc.include = {NESTING_CONF}")
    lines += [
        # lxcfs's hooks (from common.conf.d): the post-stop one only sleeps 0.5 s, the mount
        # one spawns a shell and ~20 commands per start. Its mounts are done below instead.
        "lxc.hook.post-stop =",
        "lxc.hook.mount =",
        f"lxc.uts.name = {spec.name.rpartition('_')[2]}",  # without the project prefix
        f"lxc.rootfs.path = dir:{spec.rootfs}",
        f"lxc.log.file = {directory}/lxc.log",
        "lxc.log.level = warn",
        f"lxc.console.logfile = {directory}/console.log",
        "lxc.console.size = auto",
        "lxc.console.buffer.size = auto",
        "lxc.signal.halt = SIGPWR",
        "lxc.autodev = 1",
        # No /dev/ttyN, as with LXD (common.conf asks for 4): the console and ptys remain.
        "lxc.tty.max = 0",
    ]
    lines += lxcfs_lines(lxcfs_dir)
    if not spec.privileged:
        lines += [
            f"lxc.idmap = u 0 {idmap.host_base} {idmap.size}",
            f"lxc.idmap = g 0 {idmap.host_base} {idmap.size}",
            "lxc.rootfs.options = idmap=container",
        ]
    nics = [(n, d) for n, d in sorted(spec.devices.items()) if d.get("type") == "nic"]
    for index, (device, nic) in enumerate(nics):
        lines += _nic_lines(index, spec.name, device, nic)
    if not nics:
        # With no lxc.net entry at all LXC would share the HOST's network namespace (and an
        # init running udhcpc on "eth0" would reconfigure the host). Always a netns of its own.
        lines.append("lxc.net.0.type = empty")
    for device, dev in sorted(spec.devices.items()):
        if dev.get("type") != "nic":
            lines += _device_lines(spec, device, dev, cgroup_prefix)
    items = (
        limits_mod.cgroup_v1_items(parsed, include_resets=False)
        if _CGROUP_V1
        else limits_mod.cgroup_v2_items(parsed, include_resets=False)
    )
    lines += [f"{cgroup_prefix}.{key} = {value}" for key, value in items]
    # Every entry above is one `key = value` line, whatever a record holds: a value with
    # a line break (or a NUL, which ends liblxc's read of the line) would otherwise write
    # keys of its own, such as lxc.hook.* (run as root on the host). One scan of a few
    # dozen short strings: nothing next to the rest of a start.
    for line in lines:
        if "\n" in line or "\r" in line or "\0" in line:
            key = line.partition("=")[0].strip()
            raise InvalidArgument(
                f"Invalid LXC configuration value for {key}: {go_quote(line)} holds a line "
                "break or NUL"
            )
    # raw.lxc is LXC configuration by design, checked here too as LXD checks it.
    raw = InstanceConfig(spec.config).string("raw.lxc")
    if raw:
        lines.append("# raw.lxc")
        lines += raw.splitlines()
    return "\n".join(lines) + "\n"


# --- confined file access -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """open `path` with `root_fd` as "/": absolute symlinks and ".." cannot leave it."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@contextlib.contextmanager
def _acting_as(host_uid: int, host_gid: int) -> Iterator[None]:
    """Create files as host_uid/host_gid in this thread (fsuid is per thread), keeping
    root's file capabilities. Needed on an idmapped mount, where host root's own ids are
    not mapped and creating a file as root fails with EOVERFLOW."""
    _libc.setfsgid(host_gid)
    _libc.setfsuid(host_uid)
    try:
        # Changing fsuid away from 0 drops CAP_DAC_OVERRIDE & co from the effective set;
        # they are still permitted, so raise them again.
        header = _CapHeader(0x20080522, 0)
        data = (_CapData * 2)()
        if _libc.capget(ctypes.byref(header), data) != 0:
            raise Internal(f"capget failed: {os.strerror(ctypes.get_errno())}")
        for word in data:
            word.effective = word.permitted
        if _libc.capset(ctypes.byref(header), data) != 0:
            raise Internal(f"capset failed: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


@dataclass
class _Root:
    """An instance's "/" seen from the host, and how its ids are shifted there."""

    fd: int
    shift: int  # host id = shift + instance id (0 for stopped or privileged instances)
    size: int

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        if not 0 <= uid < self.size or not 0 <= gid < self.size:
            raise InvalidArgument(f"uid/gid {uid}/{gid} is outside the instance's id map")
        return uid + self.shift, gid + self.shift

    def from_host(self, host_id: int) -> int:
        if self.shift == 0:
            return host_id
        inside = host_id - self.shift
        return inside if 0 <= inside < self.size else 65534  # the overflow id, as inside

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        if self.shift:
            with _acting_as(self.shift, self.shift):
                yield
        else:
            yield

    def close(self) -> None:
        os.close(self.fd)


def _split(path: str) -> tuple[str, str]:
    if not path.startswith("/"):
        raise InvalidArgument(f'Path "{path}" must be absolute')
    normalized = posixpath.normpath(path)
    if normalized in ("/", "//"):
        return "/", ""
    return posixpath.dirname(normalized), posixpath.basename(normalized)


def _open_parent(root: _Root, path: str) -> tuple[int, str]:
    parent, base = _split(path)
    if not base:
        raise InvalidArgument("This operation needs a path below /")
    try:
        fd = openat2_in_root(root.fd, parent, os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        raise NotFound(f'Directory "{parent}" not found in the instance') from None
    except NotADirectoryError:
        raise InvalidArgument(f'"{parent}" is not a directory in the instance') from None
    return fd, base


async def _to_the_end(function: Callable[..., None], *args: object) -> None:
    """`function(*args)` in a thread, run and awaited to its end even if the caller is
    cancelled before it started (`in_thread` would then drop it): cleanup that must
    happen. The cancel is raised after."""
    work = asyncio.ensure_future(in_thread(function, *args))
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- exec ---------------------------------------------------------------------------


class LXCExecProcess(ExecProcess):
    """An `lxc-attach` child; the command itself is lxc-attach's child (CLONE_PARENT)."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        pty: int | None,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
    ) -> None:
        self._process = process
        self.pid = process.pid
        self.pty = pty
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    async def wait(self) -> int:
        code = await self._process.wait()
        return 128 - code if code < 0 else code

    def _command_pid(self) -> int | None:
        """The command: lxc-attach's child in the container's pid namespace. Its other
        child, the one that entered the namespaces and started the command, may still be
        listed (a zombie not yet reaped) and must not take the command's signals."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                children = f.read().split()
            own_namespace = os.readlink(f"/proc/{self.pid}/ns/pid")
        except OSError:
            return None
        for child in children:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{child}/ns/pid") != own_namespace:
                    return int(child)
        return None

    def signal(self, signum: int) -> None:
        target = self._command_pid() or self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)

    def resize(self, width: int, height: int) -> None:
        if self.pty is None:
            return
        # The kernel sends SIGWINCH to lxc-attach (the pty is its controlling terminal),
        # which copies the size into the container's pty.
        fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self) -> None:
        for attr in ("pty", "stdin", "stdout", "stderr"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)


class LXCConsoleProcess(LXCExecProcess):
    """A process attached to a container's console. Any signal detaches it: it is the
    helper that gets it, not what runs on the console."""

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


async def _on_a_pty(
    args: list[str], width: int, height: int, cwd: str = "/"
) -> tuple[asyncio.subprocess.Process, int]:
    """Run `args` with a new pty of `width`x`height` as its controlling terminal; the
    master fd is returned with the process."""
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    # The container's pty does the line discipline; ours only carries bytes (else
    # every "\n" arrives as "\r\r\n").
    tty.setraw(slave)
    try:
        # lxc-attach and lxc_console() proxy the container's pty through /dev/tty, so
        # the slave must be their controlling terminal: `setsid --ctty` does that.
        process = await asyncio.create_subprocess_exec(
            "setsid", "--ctty", *args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return process, master


# --- the driver -----------------------------------------------------------------------


class LXCDriver(InstanceDriver):
    """LXC system containers under one lxcpath (`<lxcpath>/<name>/config`)."""

    name: ClassVar[str] = "lxc"
    instance_type: ClassVar[str] = "container"
    capabilities: ClassVar[Capabilities] = Capabilities(
        live_limits=True,
        freeze=True,
        exec=True,
        console_log=True,
        files_when_stopped=True,
        privileged=True,
        survives_service_restart=True,
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # liblxc imported (this module would not have); the tools it runs must be there.
        for tool in ("lxc-start", "lxc-attach"):
            if shutil.which(tool) is None:
                return f"{tool} not found"
        return None

    def __init__(
        self,
        lxcpath: str = "/var/lib/croft/lxc",
        idmap: IdMap | None = None,
        lxcfs_dir: str = LXCFS_DIR,
    ) -> None:
        self.lxcpath = lxcpath
        self.idmap = idmap or default_idmap()
        self.lxcfs_dir = lxcfs_dir
        os.makedirs(lxcpath, mode=0o711, exist_ok=True)
        self._sweep_partial_definitions()

    # -- helpers

    def _dir(self, name: str) -> str:
        validate_name(name)
        return os.path.join(self.lxcpath, name)

    def _container(self, name: str) -> lxc.Container:
        directory = self._dir(name)
        if not os.path.exists(os.path.join(directory, "config")):
            raise NotFound(f'Instance "{name}" not found')
        return lxc.Container(name, self.lxcpath)

    def _status(self, container: lxc.Container) -> Status:
        return _STATUS.get(container.state, Status.ERROR)

    def _config_lines(self, name: str) -> list[str]:
        with open(os.path.join(self._dir(name), "config")) as f:
            return f.read().splitlines()

    def _config_values(self, name: str, key: str) -> list[str]:
        values = []
        for line in self._config_lines(name):
            k, sep, v = line.partition("=")
            if sep and k.strip() == key:
                values.append(v.strip())
        return values

    def _veths(self, name: str) -> list[str]:
        return [
            v
            for line in self._config_lines(name)
            if (m := re.match(r"^lxc\.net\.\d+\.veth\.pair\s*=\s*(\S+)", line))
            for v in [m.group(1)]
        ]

    def _prepare_start(
        self, name: str, before: Callable[[Status], None] | None
    ) -> tuple[bool, list[str]]:
        """Run the caller's `before`, refuse a running container, clear what a crashed
        start left. Returns whether the definition runs hooks, and the host-side names of
        its bridged NICs. One trip to the thread pool for all of it."""
        status = self._status(self._container(name))
        if before is not None:
            before(status)
        if status is not Status.STOPPED:
            raise Conflict(f'Instance "{name}" is already running')
        self._remove_leftovers(name, unless_clean=True)
        lines = self._config_lines(name)
        hooks = any(
            line.startswith("lxc.hook.") and line.partition("=")[2].strip() for line in lines
        )
        return hooks, _bridge_ports(lines)

    def _remove_leftovers(self, name: str, unless_clean: bool = False) -> None:
        """Empty cgroups liblxc leaves on cgroup v1 (lxc.monitor.NAME[-N], and
        lxc.payload.NAME after a failed start) and veths of a crashed start. rmdir only
        removes empty cgroups, so a running container's are safe.

        liblxc names a cgroup NAME, or NAME-1, NAME-2... when the previous ones exist, so
        the candidates are probed by name: listing each hierarchy instead costs time in
        proportion to the number of containers, on every start.

        `unless_clean` (before a start): look in one hierarchy first, and sweep them all
        only if a leftover is there. A stop or delete sweeps after every container, so
        leftovers before a start come from a crash (a killed monitor), which leaves them
        in every hierarchy. One missed elsewhere only makes liblxc pick the next index."""
        hierarchies = _cgroup_hierarchies()
        if unless_clean and hierarchies:
            probe = hierarchies[0]
            if not any(
                os.path.lexists(os.path.join(probe, f"lxc.{kind}.{name}{suffix}"))
                for kind in ("monitor", "payload")
                for suffix in ("", "-1")
            ):
                hierarchies = ()
        for base in hierarchies:
            for kind in ("monitor", "payload"):
                stem = os.path.join(base, f"lxc.{kind}.{name}")
                misses = 0
                for index in range(1000):
                    try:
                        os.rmdir(stem if index == 0 else f"{stem}-{index}")
                        misses = 0
                    except FileNotFoundError:
                        misses += 1
                        if misses > 3:  # a gap of a few tolerated, in case
                            break
                    except OSError:  # busy (in use) or not empty: not a leftover
                        misses = 0
        with contextlib.suppress(OSError):
            for veth in self._veths(name):
                if os.path.exists(f"/sys/class/net/{veth}"):
                    run(["ip", "link", "del", veth], check=False, timeout=10)

    def _log_errors_since(self, name: str, offset: int) -> str:
        try:
            with open(os.path.join(self._dir(name), "lxc.log"), "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        errors = [line.split(" - ", 2)[-1] for line in text.splitlines() if " ERROR " in line]
        return "; ".join(errors[:3])

    def _log_size(self, name: str) -> int:
        try:
            return os.path.getsize(os.path.join(self._dir(name), "lxc.log"))
        except OSError:
            return 0

    # -- lifecycle

    async def create(self, spec: InstanceSpec) -> None:
        await in_thread(self._write_new, spec)

    def _render(self, spec: InstanceSpec) -> str:
        """The LXC configuration of `spec`; InvalidArgument for a bad spec."""
        config = render_config(spec, self.lxcpath, spec.idmap or self.idmap, self.lxcfs_dir)
        if not os.path.isdir(spec.rootfs):
            raise InvalidArgument(f'Root filesystem "{spec.rootfs}" is not a directory')
        return config

    def _write_new(self, spec: InstanceSpec) -> None:
        config = self._render(spec)
        directory = self._dir(spec.name)
        if os.path.lexists(directory):
            raise Conflict(f'Instance "{spec.name}" already exists')
        # Written aside, then moved into place by one rename: a process killed half-way
        # leaves a hidden directory (swept later), never a half-written definition that
        # `exists()` does not see and that holds the name.
        for stale in glob.glob(os.path.join(self.lxcpath, f"{_PARTIAL}{glob.escape(spec.name)}.*")):
            shutil.rmtree(stale, ignore_errors=True)  # a dead create's: no other runs now
        partial = tempfile.mkdtemp(prefix=f"{_PARTIAL}{spec.name}.", dir=self.lxcpath)
        try:
            with open(os.path.join(partial, "config"), "w") as f:
                f.write(config)
            try:
                os.rename(partial, directory)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise Conflict(f'Instance "{spec.name}" already exists') from None
                raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            container = lxc.Container(spec.name, self.lxcpath)
            if not container.defined:
                raise Internal(f'liblxc does not accept the configuration of "{spec.name}"')
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    async def redefine(self, spec: InstanceSpec) -> None:
        await in_thread(self._rewrite, spec)

    def _rewrite(self, spec: InstanceSpec) -> None:
        config = self._render(spec)
        if self._status(self._container(spec.name)) is not Status.STOPPED:
            raise Conflict(f'Instance "{spec.name}" must be stopped to change its definition')
        directory = self._dir(spec.name)
        tmp = os.path.join(directory, "config.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(config)
            # liblxc must load it before it replaces the one that works: a definition it
            # refuses (a key of raw.lxc it does not know) would make every later change,
            # the one that takes it back included, fail to load the instance at all.
            # LXD loads raw.lxc into liblxc on every update the same way.
            if not _loads(tmp):
                raise InvalidArgument(
                    "Failed to load raw.lxc: liblxc refuses the configuration it makes"
                )
            os.rename(tmp, os.path.join(directory, "config"))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _sweep_partial_definitions(self) -> None:
        """Remove what creates killed half-way left, once surely no create runs on it."""
        for partial in glob.glob(os.path.join(self.lxcpath, f"{_PARTIAL}*")):
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(partial).st_mtime > _PARTIAL_AGE:
                    shutil.rmtree(partial, ignore_errors=True)

    async def start(self, name: str, before: Callable[[Status], None] | None = None) -> None:
        hooks, bridge_ports = await in_thread(self._prepare_start, name, before)
        offset = self._log_size(name)
        # lxc-start daemonizes (closing every inherited fd) and returns once the container
        # runs; its monitor is a small C process that is no child of ours.
        code, _, stderr = await run_async(
            [_LXC_START, "-n", name, "-P", self.lxcpath],
            check=False,
            timeout=60,
            env=None if hooks else _LXC_START_ENV,
        )
        if code != 0:
            await in_thread(self._remove_leftovers, name)
            detail = self._log_errors_since(name, offset) or stderr.decode(errors="replace")
            raise Internal(f'Failed to start instance "{name}": {detail.strip()}')
        for veth in bridge_ports:
            _no_ipv6_of_its_own(veth)  # a few /proc/sys writes: no trip to a thread

    async def stop(self, name: str, force: bool = False, timeout: float = 30.0) -> None:
        container = await in_thread(self._container, name)
        status = self._status(container)
        if status == Status.STOPPED:
            raise Conflict(f'Instance "{name}" is not running')
        if status == Status.FROZEN:
            # A frozen init cannot act on SIGPWR, and on cgroup v1 killed tasks stay
            # frozen until thawed.
            await in_thread(container.unfreeze)
        if not force:
            seconds = max(1, math.ceil(timeout))
            if not await in_thread(container.shutdown, seconds):
                force = True
        if force and container.running and not await in_thread(container.stop):
            raise Internal(f'Failed to stop instance "{name}"')
        await in_thread(container.wait, "STOPPED", 10)
        await in_thread(self._remove_leftovers, name)

    async def restart(self, name: str, force: bool = False, timeout: float = 30.0) -> None:
        await self.stop(name, force=force, timeout=timeout)
        await self.start(name)

    async def freeze(self, name: str) -> None:
        container = await in_thread(self._container, name)
        if self._status(container) != Status.RUNNING:
            raise Conflict(f'Instance "{name}" is not running')
        if not await in_thread(container.freeze):
            raise Internal(f'Failed to freeze instance "{name}"')

    async def unfreeze(self, name: str) -> None:
        container = await in_thread(self._container, name)
        if self._status(container) != Status.FROZEN:
            raise Conflict(f'Instance "{name}" is not frozen')
        if not await in_thread(container.unfreeze):
            raise Internal(f'Failed to unfreeze instance "{name}"')

    async def delete(self, name: str) -> None:
        container = await in_thread(self._container, name)
        if container.running:
            raise Conflict(f'Instance "{name}" is running; stop it first')
        await in_thread(self._remove_leftovers, name)
        directory = self._dir(name)
        rootfs = (self._config_values(name, "lxc.rootfs.path") or [""])[-1].removeprefix("dir:")

        def remove() -> None:
            for entry in os.listdir(directory):
                path = os.path.join(directory, entry)
                if os.path.realpath(path) == os.path.realpath(rootfs):
                    continue  # the storage service's, should it live here
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(directory)

        await in_thread(remove)

    async def list(self) -> list[str]:
        def names() -> list[str]:
            return sorted(
                entry
                for entry in os.listdir(self.lxcpath)
                if _NAME_RE.match(entry)
                and os.path.exists(os.path.join(self.lxcpath, entry, "config"))
            )

        return await in_thread(names)

    async def exists(self, name: str) -> bool:
        return await in_thread(os.path.exists, os.path.join(self._dir(name), "config"))

    # -- state

    async def status(self, name: str) -> Status:
        container = await in_thread(self._container, name)
        return self._status(container)

    async def active(self) -> frozenset[str] | None:
        """liblxc's monitor of a running container listens on the abstract unix socket
        `@<lxcpath>/<name>/command`: all of them, from one read of /proc/net/unix. (A path
        too long for a socket address gets a hashed name: not found here, such an
        instance looks stopped, and the caller asks status() about it.)"""
        prefix = f"@{self.lxcpath.rstrip('/')}/"

        def read() -> frozenset[str]:
            names = set()
            with open("/proc/net/unix", "rb") as f:
                for line in f:
                    path = line.rpartition(b" ")[2].rstrip(b"\n").decode(errors="replace")
                    if path.startswith(prefix) and path.endswith("/command"):
                        names.add(path[len(prefix) : -len("/command")])
            return frozenset(names)

        try:
            return await in_thread(read)
        except OSError:
            return None

    async def state(self, name: str) -> InstanceState:
        container = await in_thread(self._container, name)

        def read() -> InstanceState:
            status = self._status(container)
            if status == Status.STOPPED:
                return InstanceState(status=status, pid=0)

            def item(*keys: str) -> str:
                for key in keys:
                    if value := cgroup_value(container, key):
                        return value
                return ""

            def number(text: str) -> int:
                return int(text) if text.isdigit() else 0

            limit = number(item("memory.limit_in_bytes", "memory.max"))
            cpu = item("cpuacct.usage")
            if not cpu:
                usec = re.search(r"usage_usec (\d+)", item("cpu.stat"))
                cpu = str(int(usec.group(1)) * 1000) if usec else "0"
            return InstanceState(
                status=status,
                pid=container.init_pid,
                processes=number(item("pids.current")),
                memory_usage=number(item("memory.usage_in_bytes", "memory.current")),
                memory_limit=0 if limit >= 2**62 else limit,
                cpu_usage_ns=number(cpu),
            )

        result = await in_thread(read)
        if result.pid > 0:
            result.network = await self._network(result.pid)
        return result

    async def _network(self, pid: int) -> dict[str, NetworkInterface]:
        try:
            return await netns.interfaces(pid)
        except OSError:
            return {}  # the instance stopped meanwhile

    # -- limits

    def nic_host_name(self, name: str, device: str) -> str:
        return _veth_name(name, device)

    async def hotplug_nic(self, name: str, device: str, nic: dict[str, str]) -> None:
        # LXD's way for a bridged NIC: a veth pair, the host side on the bridge, the
        # other moved into the container's network namespace under the NIC's name.
        if nic.get("nictype") != "bridged" or not nic.get("parent"):
            raise InvalidArgument(
                f'Device "{device}": only bridged NICs can be added to a running instance'
            )
        pid, _ = await in_thread(self._running_pid, name)
        host = nic.get("host_name") or _veth_name(name, device)
        await in_thread(_plug_veth, pid, host, nic.get("name") or device, nic)

    async def unplug_nic(self, name: str, device: str, nic: dict[str, str]) -> None:
        host = nic.get("host_name") or _veth_name(name, device)
        if os.path.exists(f"/sys/class/net/{host}"):
            await run_async(["ip", "link", "del", host], timeout=30, check=False)

    async def hotplug_disk(self, name: str, source: str, path: str, *, readonly: bool) -> None:
        target = "/" + _mount_target(name, path)
        pid, privileged = await in_thread(self._running_pid, name)
        argv = [sys.executable, "-m", "croft.compute.mountns", "plug", str(pid), source, target]
        argv += (["--readonly"] if readonly else []) + ([] if privileged else ["--idmap"])
        await self._mountns(argv, f'Failed to mount "{source}" at "{path}"')

    async def unplug_disk(self, name: str, path: str) -> None:
        target = "/" + _mount_target(name, path)
        pid, _ = await in_thread(self._running_pid, name)
        argv = [sys.executable, "-m", "croft.compute.mountns", "unplug", str(pid), target]
        await self._mountns(argv, f'Failed to unmount "{path}"')

    def _running_pid(self, name: str) -> tuple[int, bool]:
        container = self._container(name)
        if not container.running:
            raise InvalidArgument("The instance isn't running")
        return container.init_pid, not self._config_values(name, "lxc.idmap")

    @staticmethod
    async def _mountns(argv: builtins.list[str], what: str) -> None:
        code, _, err = await run_async(argv, timeout=60, check=False)
        if code != 0:
            raise InvalidArgument(f"{what}: {err.decode(errors='replace').strip()}")

    async def update_limits(self, name: str, config: dict[str, str]) -> None:
        parsed = limits_mod.parse_limits(config)  # InvalidArgument before any change
        container = await in_thread(self._container, name)
        directory = self._dir(name)
        cgroup_prefix = "lxc.cgroup" if _CGROUP_V1 else "lxc.cgroup2"
        items_for = limits_mod.cgroup_v1_items if _CGROUP_V1 else limits_mod.cgroup_v2_items

        def apply_live() -> None:
            if not container.running:
                return
            applied: list[tuple[str, str]] = []
            for key, value in items_for(parsed):
                previous = cgroup_value(container, key)
                if container.set_cgroup_item(key, value):
                    applied.append((key, previous))
                    continue
                for done_key, old in reversed(applied):
                    if old:
                        container.set_cgroup_item(done_key, old)
                raise Conflict(
                    f'The kernel refused {key}={value} for instance "{name}" '
                    "(for memory: is the instance using more than that now?)"
                )

        def persist() -> None:
            kept = []
            for line in self._config_lines(name):
                key = line.partition("=")[0].strip()
                if key.startswith(("lxc.cgroup.", "lxc.cgroup2.")) and (
                    key.split(".", 2)[2] in _LIMIT_CGROUP_KEYS
                ):
                    continue
                kept.append(line)
            kept += [
                f"{cgroup_prefix}.{key} = {value}"
                for key, value in items_for(parsed, include_resets=False)
            ]
            tmp = os.path.join(directory, "config.tmp")
            with open(tmp, "w") as f:
                f.write("\n".join(kept) + "\n")
            os.rename(tmp, os.path.join(directory, "config"))

        await in_thread(apply_live)
        await in_thread(persist)

    # -- exec

    async def start_exec(self, name: str, run: ExecCommand) -> ExecProcess:
        argv, env, cwd = run.argv, run.env, run.cwd
        uid, gid, interactive = run.uid, run.gid, run.interactive
        width, height = run.width, run.height
        container = await in_thread(self._container, name)
        if self._status(container) != Status.RUNNING:
            raise Conflict(f'Instance "{name}" is not running')
        for key in env:
            if not key or "=" in key:
                raise InvalidArgument(f'Invalid environment variable name "{key}"')
        workdir = cwd or env.get("HOME") or "/"
        if not workdir.startswith("/"):
            raise InvalidArgument(f'cwd "{workdir}" must be absolute')

        command = list(argv)
        host_cwd = "/"
        if workdir != "/":
            # An explicit cwd must exist. The default home need not be checked (two liblxc
            # round trips per exec): lxc-attach falls back to / when it cannot chdir inside
            # the container, which is LXD's behaviour for a missing home.
            if cwd is not None and not await self._is_dir_inside(container, workdir):
                raise InvalidArgument(f'Directory "{workdir}" not found in the instance')
            # lxc-attach chdirs to its own cwd's path inside the container; when the host
            # has no directory by that name, a shell does the chdir instead.
            if os.path.isdir(workdir):
                host_cwd = workdir
            elif cwd is not None:
                command = ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', workdir, *command]

        args = [_LXC_ATTACH, "-n", name, "-P", self.lxcpath, "--clear-env"]
        for key, value in env.items():
            args += ["-v", f"{key}={value}"]
        if uid:
            args += ["-u", str(uid)]
        if gid:
            args += ["-g", str(gid)]
        args += ["--", *command]

        if interactive:
            process, master = await _on_a_pty(args, width, height, cwd=host_cwd)
            return LXCExecProcess(process, master, None, None, None)

        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *args, stdin=stdin_r, stdout=stdout_w, stderr=stderr_w, cwd=host_cwd,
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        return LXCExecProcess(process, None, stdin_w, stdout_r, stderr_r)

    async def _is_dir_inside(self, container: lxc.Container, path: str) -> bool:
        root = await in_thread(self._open_root, container)
        try:
            fd = await in_thread(openat2_in_root, root.fd, path, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return False
        finally:
            root.close()
        os.close(fd)
        return True

    # -- files

    def _open_root(self, container: lxc.Container) -> _Root:
        name = container.name
        if container.running:
            pid = container.init_pid
            privileged = not self._config_values(name, "lxc.idmap")
            fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if privileged:
                return _Root(fd, 0, 2**32 - 1)
            base, size = self._idmap_of(name)
            return _Root(fd, base, size)
        rootfs = (self._config_values(name, "lxc.rootfs.path") or [""])[-1].removeprefix("dir:")
        try:
            fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Internal(f'Root filesystem of "{name}" is missing: {exc}') from None
        # The rootfs on disk is unshifted (idmapped at start), so instance ids = disk ids.
        size = 2**32 - 1 if not self._config_values(name, "lxc.idmap") else self._idmap_of(name)[1]
        return _Root(fd, 0, size)

    def _idmap_of(self, name: str) -> tuple[int, int]:
        for value in self._config_values(name, "lxc.idmap"):
            parts = value.split()
            if len(parts) == 4 and parts[0] == "u" and parts[1] == "0":
                return int(parts[2]), int(parts[3])
        return self.idmap.host_base, self.idmap.size

    async def _root(self, name: str) -> _Root:
        container = await in_thread(self._container, name)
        return await in_thread(self._open_root, container)

    async def push_file(
        self,
        name: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
    ) -> None:
        if not 0 <= mode <= 0o7777:
            raise InvalidArgument(f"Invalid file mode {mode:o}")
        root = await self._root(name)
        try:
            host_uid, host_gid = root.to_host(uid, gid)
            # A name of its own in the target's directory (a rename never crosses
            # filesystems), hidden, and unlikely to be anyone else's.
            base = _split(path)[1]
            temporary = f".{base[:200]}.croft-{secrets.token_hex(6)}"

            def create() -> tuple[int, int]:
                parent, base = _open_parent(root, path)
                try:
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(base, dir_fd=parent, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            raise InvalidArgument(f'"{path}" is a directory in the instance')
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    with root.writer():
                        fd = os.open(temporary, flags, mode & 0o777, dir_fd=parent)
                        try:
                            os.fchown(fd, host_uid, host_gid)
                            os.fchmod(fd, mode)
                        except BaseException:
                            os.close(fd)
                            with contextlib.suppress(OSError):
                                os.unlink(temporary, dir_fd=parent)
                            raise
                    return fd, parent
                except BaseException:
                    os.close(parent)
                    raise

            def finish(complete: bool) -> None:
                try:
                    os.close(fd)
                    with root.writer():
                        if complete:
                            # Over a file or a symlink (replaced, not followed), as LXD does.
                            os.rename(temporary, base, src_dir_fd=parent, dst_dir_fd=parent)
                        else:
                            with contextlib.suppress(OSError):
                                os.unlink(temporary, dir_fd=parent)
                finally:
                    os.close(parent)

            fd, parent = await in_thread(create)
            complete = False
            try:
                if isinstance(data, bytes | bytearray | memoryview):
                    await in_thread(_write_all, fd, bytes(data))
                else:
                    async for chunk in data:
                        await in_thread(_write_all, fd, chunk)
                complete = True
            finally:
                # Even when cancelled (the sender went away): the file is renamed into
                # place or removed, and the fds closed, before this returns.
                await _to_the_end(finish, complete)
        finally:
            root.close()

    async def pull_file(self, name: str, path: str) -> FileEntry:
        root = await self._root(name)

        def read() -> FileEntry:
            parent_path, base = _split(path)
            if not base:
                fd = openat2_in_root(root.fd, "/", os.O_RDONLY | os.O_DIRECTORY)
                return self._entry_from_fd(root, "/", fd)
            parent, base = _open_parent(root, path)
            try:
                try:
                    st = os.stat(base, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    raise NotFound(f'"{path}" not found in the instance') from None
                if stat.S_ISLNK(st.st_mode):
                    return FileEntry(
                        path=path,
                        type="symlink",
                        uid=root.from_host(st.st_uid),
                        gid=root.from_host(st.st_gid),
                        mode=stat.S_IMODE(st.st_mode),
                        target=os.readlink(base, dir_fd=parent),
                    )
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    raise InvalidArgument(f'"{path}" is not a file, directory or symlink')
                fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                return self._entry_from_fd(root, path, fd)
            finally:
                os.close(parent)

        try:
            return await in_thread(read)
        finally:
            root.close()

    @staticmethod
    def _entry_from_fd(root: _Root, path: str, fd: int) -> FileEntry:
        try:
            st = os.fstat(fd)
            entry = FileEntry(
                path=path,
                type="directory" if stat.S_ISDIR(st.st_mode) else "file",
                uid=root.from_host(st.st_uid),
                gid=root.from_host(st.st_gid),
                mode=stat.S_IMODE(st.st_mode),
            )
            if stat.S_ISDIR(st.st_mode):
                entry.entries = sorted(os.listdir(fd))
            else:
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                entry.content = b"".join(chunks)
            return entry
        finally:
            os.close(fd)

    async def list_dir(self, name: str, path: str) -> builtins.list[str]:
        entry = await self.pull_file(name, path)
        if entry.entries is None:
            raise InvalidArgument(f'"{path}" is not a directory in the instance')
        return entry.entries

    async def mkdir(
        self, name: str, path: str, uid: int = 0, gid: int = 0, mode: int = 0o755
    ) -> None:
        root = await self._root(name)

        def make() -> None:
            host_uid, host_gid = root.to_host(uid, gid)
            parent, base = _open_parent(root, path)
            try:
                with root.writer():
                    try:
                        os.mkdir(base, mode & 0o777, dir_fd=parent)
                    except FileExistsError:
                        raise Conflict(f'"{path}" already exists in the instance') from None
                    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
                    try:
                        os.fchown(fd, host_uid, host_gid)
                        os.fchmod(fd, mode)
                    finally:
                        os.close(fd)
            finally:
                os.close(parent)

        try:
            await in_thread(make)
        finally:
            root.close()

    async def delete_path(self, name: str, path: str, recursive: bool = False) -> None:
        root = await self._root(name)

        def remove() -> None:
            parent, base = _open_parent(root, path)
            try:
                try:
                    st = os.stat(base, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    raise NotFound(f'"{path}" not found in the instance') from None
                with root.writer():
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(base, dir_fd=parent)
                    elif recursive:
                        shutil.rmtree(base, dir_fd=parent)
                    else:
                        try:
                            os.rmdir(base, dir_fd=parent)
                        except OSError as exc:
                            raise Conflict(f'Directory "{path}" is not empty') from exc
            finally:
                os.close(parent)

        try:
            await in_thread(remove)
        finally:
            root.close()

    # -- console and logs

    async def console_log(self, name: str) -> bytes:
        await in_thread(self._container, name)
        path = os.path.join(self._dir(name), "console.log")

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return b""

        return await in_thread(read)

    async def clear_console_log(self, name: str) -> None:
        await in_thread(self._container, name)
        path = os.path.join(self._dir(name), "console.log")
        # liblxc appends to it (O_APPEND): emptied, it goes on from the start.
        with contextlib.suppress(FileNotFoundError):
            await in_thread(os.truncate, path, 0)

    async def console(self, name: str, width: int = 80, height: int = 24) -> ExecProcess:
        container = await in_thread(self._container, name)
        if self._status(container) != Status.RUNNING:
            raise Conflict(f'Instance "{name}" is not running')
        args = [sys.executable, "-c", _CONSOLE_HELPER, name, self.lxcpath]
        process, master = await _on_a_pty(args, width, height)
        return LXCConsoleProcess(process, master, None, None, None)

    def log_path(self, name: str) -> str:
        return os.path.join(self._dir(name), "lxc.log")


def _loads(config_file: str) -> bool:
    """Whether liblxc accepts the LXC configuration in `config_file` (~0.3 ms)."""
    with tempfile.TemporaryDirectory(prefix=".croft-check.") as scratch:
        return bool(lxc.Container("check", scratch).load_config(config_file))
