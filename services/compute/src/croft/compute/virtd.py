"""The host daemons the qemu driver needs: `virtlogd` and `libvirtd`, started and watched
by the compute service as the node agent does etcd (there is no systemd to do it).

libvirt's system daemon is one per host (its sockets are under /run/libvirt): a daemon
already answering there is used, whoever started it. The ones croft starts keep their
pidfiles and logs under croft's state and log directories, and are not stopped with the
compute service: running VMs, and a libvirtd that knows them, outlive it, as LXD's VMs
outlive LXD.

The daemons run in the host's network namespace (PID 1's), whichever namespace the
compute service that starts them runs in (a test cluster's members run in their own): a
libvirtd started in a member's namespace would serve every croft on the host, and plug
their VMs' taps into bridges it cannot see ("Cannot get interface MTU").

Before libvirtd starts, /dev/kvm must be group `kvm`, mode 0660 (udev's rule, which this
host lacks): otherwise libvirt sees KVM come and go between probes and re-probes QEMU's
capabilities on every lookup, which makes each domain definition take 30-50 s.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from croft.common.errors import Internal

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/libvirt")
KVM_DEVICE = Path("/dev/kvm")
START_TIMEOUT = 30.0
CHECK_INTERVAL = 5.0


@dataclass(frozen=True)
class Daemon:
    name: str  # the binary
    socket: Path  # answers once the daemon serves


DAEMONS = (
    Daemon("virtlogd", RUN_DIR / "virtlogd-sock"),
    Daemon("libvirtd", RUN_DIR / "libvirt-sock"),
)


def fix_kvm_permissions(device: Path = KVM_DEVICE) -> None:
    """/dev/kvm as udev would leave it: group kvm, mode 0660."""
    try:
        st = device.stat()
    except FileNotFoundError:
        return
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    if st.st_gid != gid:
        os.chown(device, -1, gid)
    if stat.S_IMODE(st.st_mode) & 0o060 != 0o060:
        os.chmod(device, stat.S_IMODE(st.st_mode) | 0o060)


def answers(path: Path) -> bool:
    """Whether a daemon accepts connections on its unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


# The host's network namespace, as the first of these processes shows it: PID 1, or,
# where PID 1 is not readable (a sandbox's init of another owner), kthreadd, which
# every kernel thread shares and which lives in the initial namespace.
HOST_NETNS_CANDIDATES = (Path("/proc/1/ns/net"), Path("/proc/2/ns/net"))
_warned: set[int] = set()  # daemons found elsewhere, said once each


def _netns(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def host_netns() -> tuple[Path, str] | None:
    """The host's network namespace (its /proc link and its identity), or None when no
    candidate can be read."""
    for link in HOST_NETNS_CANDIDATES:
        try:
            return link, os.readlink(link)
        except OSError:
            continue
    return None


def in_host_netns(argv: list[str]) -> list[str]:
    """`argv` run in the host's network namespace (through nsenter when this process is
    in another one)."""
    host = host_netns()
    if host is None or host[1] == _netns("self") or shutil.which("nsenter") is None:
        return argv
    return ["nsenter", f"--net={host[0]}", "--", *argv]


def server_pid(path: Path) -> int:
    """The pid of the process serving the unix socket (0 if unknown)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return 0
    return int(struct.unpack("3i", creds)[0])


def warn_if_elsewhere(daemon: Daemon) -> None:
    """Log an error when the daemon serving the host's socket runs in another network
    namespace than the host's: VMs would not reach the host's bridges."""
    host = host_netns()
    pid = server_pid(daemon.socket)
    where = _netns(pid) if pid else ""
    if host is not None and where and where != host[1] and pid not in _warned:
        _warned.add(pid)
        log.error(
            "%s (pid %d) runs in network namespace %s, not the host's: VMs started through "
            "it cannot use this host's bridges; stop it and croft starts one in the host's",
            daemon.name,
            pid,
            where,
        )


def missing_binaries() -> list[str]:
    return [d.name for d in DAEMONS if shutil.which(d.name) is None]


def ensure_running(state_dir: Path, log_dir: Path) -> list[str]:
    """Start whichever daemon does not answer; returns the names started. Blocking."""
    fix_kvm_permissions()
    started: list[str] = []
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for daemon in DAEMONS:
        if answers(daemon.socket):
            warn_if_elsewhere(daemon)
            continue
        binary = shutil.which(daemon.name)
        if binary is None:
            raise Internal(f"{daemon.name} is not installed (scripts/setup.sh installs it)")
        pidfile = state_dir / f"{daemon.name}.pid"
        with open(log_dir / f"{daemon.name}.log", "ab") as out:
            # `-d` daemonizes: the daemon leaves this process's session and outlives it.
            # It is the host's, not this croft's: none of croft's environment goes with it.
            env = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
            result = subprocess.run(
                in_host_netns([binary, "-d", "-p", str(pidfile)]),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=START_TIMEOUT,
                check=False,
                start_new_session=True,
            )
        if result.returncode != 0:
            raise Internal(f"{daemon.name} did not start (exit {result.returncode})")
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(daemon.socket):
            if time.monotonic() > deadline:
                raise Internal(f"{daemon.name} started but does not answer on {daemon.socket}")
            time.sleep(0.05)
        log.info("started %s (pidfile %s)", daemon.name, pidfile)
        started.append(daemon.name)
    return started


async def supervise(state_dir: Path, log_dir: Path, interval: float = CHECK_INTERVAL) -> None:
    """Runs for the life of the compute service: keeps the daemons up."""
    while True:
        try:
            await asyncio.to_thread(ensure_running, state_dir, log_dir)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (tried again at the next check)
            log.error("libvirt daemons: %s", exc)
        await asyncio.sleep(interval)
