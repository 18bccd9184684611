"""The instance driver interface: what the compute core asks of a container or VM backend.

One ABC (`InstanceDriver`), one capability declaration (`Capabilities`), one registry
(`DRIVERS`, a `croft.common.drivers.Registry`: name -> "module:Class", imported on first
use so that loading the registry never needs liblxc or libvirt). Each driver runs one
instance type (`instance_type`: LXD's record `type`); the service loads every driver that
can run on its host (`load_available`) and the core picks one per instance from its
record's type, as Incus's `instance/drivers/load.go` does. Drivers do the system work
only; the core keeps the records, locks and events.

Errors: drivers raise croft's errors (croft.common.errors): NotFound for an unknown
instance or path, Conflict for an instance in the wrong state (or one that exists
already), InvalidArgument for bad input (raised before anything is changed), Internal
(CommandFailed) when the system refuses.
"""

from __future__ import annotations

import builtins
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from croft.common.drivers import Registry
from croft.common.errors import InvalidArgument
from croft.common.instance_config import InstanceConfig

log = logging.getLogger(__name__)

# LXD's instance type when a request names none.
DEFAULT_INSTANCE_TYPE = "container"


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; the core asks these instead of checking a driver's name."""

    live_limits: bool = False  # update_limits() works on a running instance
    freeze: bool = False
    exec: bool = False
    console_log: bool = False
    files_when_stopped: bool = False  # file operations work on a stopped instance
    privileged: bool = False  # honours security.privileged=true
    survives_service_restart: bool = False  # running instances outlive the driver's process
    live_disk_move: bool = False  # move_root_disk() switches a running instance's disk


@dataclass(frozen=True)
class IdMap:
    """A shared id map: container ids 0..size-1 are host ids host_base..host_base+size-1."""

    host_base: int
    size: int = 65536


@dataclass
class InstanceSpec:
    """Everything a driver needs to create an instance.

    `config` uses LXD's keys (security.privileged, limits.cpu, limits.memory,
    limits.processes, raw.lxc, security.nesting); `devices` is the expanded device dict
    in LXD's shape (nic, disk, unix-char, unix-block). `rootfs` is a directory prepared by
    the storage service, owned by host root and not shifted: unprivileged instances see it
    through an idmapped mount. `idmap=None` takes the default (see the driver).
    """

    name: str
    rootfs: str
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    idmap: IdMap | None = None
    # The root volume's directory (the image's metadata.yaml, templates/, and for a VM
    # image its boot files), and for a block volume (a VM's) its disk; "" when unknown
    # (a redefinition keeps the previous ones).
    volume: str = ""
    disk: str = ""

    @property
    def privileged(self) -> bool:
        return InstanceConfig(self.config).bool("security.privileged")


class Status(Enum):
    """LXD's instance status names and codes."""

    RUNNING = ("Running", 103)
    STOPPED = ("Stopped", 102)
    FROZEN = ("Frozen", 110)
    ERROR = ("Error", 112)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def code(self) -> int:
        return self.value[1]


@dataclass
class NetworkAddress:
    family: str  # "inet" | "inet6"
    address: str
    netmask: str  # prefix length, as LXD reports it ("24")
    scope: str  # "global" | "link" | "local"


@dataclass
class NetworkInterface:
    """One interface inside the instance, in the shape of LXD's state.network entries."""

    name: str
    addresses: list[NetworkAddress]
    hwaddr: str
    host_name: str  # the host side of the veth ("" for loopback or non-veth)
    mtu: int
    state: str  # "up" | "down"
    type: str  # "broadcast" | "loopback" | "point-to-point"
    bytes_received: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    packets_sent: int = 0


@dataclass
class InstanceState:
    status: Status
    pid: int  # host pid of the instance's init, 0 when not running
    processes: int = 0
    memory_usage: int = 0  # bytes, from the instance's cgroup
    memory_limit: int = 0  # bytes, 0 = none
    cpu_usage_ns: int = 0
    network: dict[str, NetworkInterface] = field(default_factory=dict)


@dataclass
class FileEntry:
    """A path inside an instance. uid/gid are as seen inside the instance.

    Exactly one of `content` (type "file"), `entries` (type "directory") or `target`
    (type "symlink") is set."""

    path: str
    type: str  # "file" | "directory" | "symlink"
    uid: int
    gid: int
    mode: int  # permission bits only, e.g. 0o644
    content: bytes | None = None
    entries: list[str] | None = None
    target: str | None = None


@dataclass(frozen=True)
class ExecCommand:
    """A command to run in an instance (`InstanceDriver.start_exec`): LXD's environment
    filled in (`exec_environment`); `cwd` None for the user's home."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    uid: int
    gid: int
    interactive: bool
    width: int
    height: int


class ExecProcess(ABC):
    """A command running inside an instance.

    Interactive processes have a pty: `pty` is the master fd (read output, write input)
    and stdin/stdout/stderr are None. Otherwise stdin/stdout/stderr are pipe fds (stdin
    writable, the others readable; close stdin to send EOF). The fds belong to this
    object: `close()` closes them. They are blocking; use loop.add_reader/connect_*_pipe.
    """

    pid: int
    pty: int | None
    stdin: int | None
    stdout: int | None
    stderr: int | None

    @abstractmethod
    async def wait(self) -> int:
        """Wait for the command to end. Exit code semantics as LXD's: the command's own
        exit status; 127 when the command does not exist, 126 when it is not executable,
        128+N when killed by signal N."""

    @abstractmethod
    def signal(self, signum: int) -> None:
        """Send a signal to the command (not to a wrapper around it)."""

    @abstractmethod
    def resize(self, width: int, height: int) -> None:
        """Set the pty window size (columns, rows); no-op without a pty."""

    @abstractmethod
    def close(self) -> None:
        """Close the fds this object holds."""


class InstanceDriver(ABC):
    """One backend (LXC, QEMU). Instances are addressed by name within the driver's state
    directory; a new driver object on the same directory finds the instances a previous
    one created (`list()`), running ones included."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # The record `type` this driver runs ("container", "virtual-machine").
    instance_type: ClassVar[str]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this driver cannot run on this host (e.g. a missing kernel module or
        binary), or None when it can. Must be cheap and change nothing: the service asks
        it once at start, before constructing the driver."""
        return None

    @abstractmethod
    async def create(self, spec: InstanceSpec) -> None:
        """Define an instance (write its configuration); does not start it. The rootfs must
        exist. Raises Conflict if the name exists, InvalidArgument for a bad spec (before
        writing anything), including any config or device value that would not stay one
        value of the backend's configuration (a line break in a line-based file): no value
        may ever add a setting of its own. On failure, everything written is removed."""

    @abstractmethod
    async def redefine(self, spec: InstanceSpec) -> None:
        """Rewrite the configuration of a stopped instance from `spec`, in one step: the
        old one stays whole until the new one replaces it. InvalidArgument for a bad spec
        (as for create) and Conflict unless the instance is stopped, both before anything
        changes."""

    @abstractmethod
    async def start(self, name: str, before: Callable[[Status], None] | None = None) -> None:
        """Start a stopped instance and return once it runs. The instance must keep
        running if the calling process dies. Raises Conflict if it is running. On failure,
        the instance is left stopped with nothing of the failed start behind (cgroups,
        host network devices).

        `before`, if given, is called first, from a worker thread, with the instance's
        status: it may raise to refuse the start (nothing else is done then), or prepare
        the instance's files."""

    @abstractmethod
    async def stop(self, name: str, force: bool = False, timeout: float = 30.0) -> None:
        """Stop a running or frozen instance. Clean: ask its init to shut down (SIGPWR)
        and kill it after `timeout` seconds; force: kill at once. Returns when it is
        stopped; leftovers of the run (cgroups, host veths) are removed. Conflict if it
        is already stopped."""

    @abstractmethod
    async def restart(self, name: str, force: bool = False, timeout: float = 30.0) -> None:
        """stop() then start()."""

    @abstractmethod
    async def freeze(self, name: str) -> None:
        """Freeze every process of a running instance. Conflict unless it is running."""

    @abstractmethod
    async def unfreeze(self, name: str) -> None:
        """Thaw a frozen instance. Conflict unless it is frozen."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Remove a stopped instance's definition and everything the driver created for it
        (configuration, logs, leftover cgroups and host network devices). The rootfs is the
        storage service's and is left alone. Conflict if it is running."""

    @abstractmethod
    async def list(self) -> list[str]:
        """Names of the instances defined in this driver's state directory."""

    @abstractmethod
    async def exists(self, name: str) -> bool:
        """Whether the instance is defined."""

    @abstractmethod
    async def state(self, name: str) -> InstanceState:
        """Status, init pid, process count, memory/cpu usage and network interfaces."""

    @abstractmethod
    async def status(self, name: str) -> Status:
        """Only the status: what start/stop/delete decide on, far cheaper than state()."""

    async def active(self) -> frozenset[str] | None:
        """A quick look at every instance at once: the names of those with a running
        monitor (running or frozen), from one read; None when the driver cannot tell
        without asking each (then callers use status())."""
        return None

    def nic_host_name(self, name: str, device: str) -> str:
        """The host-side interface instance `name`'s NIC `device` gets (unless its
        `host_name` names one), known before the instance starts so the network can
        filter its traffic; "" when the driver cannot tell."""
        return ""

    async def hotplug_nic(self, name: str, device: str, nic: dict[str, str]) -> None:
        """Add NIC `device` (its `nictype`, `parent`, `hwaddr`... as the network gave
        them) to running instance `name`. InvalidArgument when the driver cannot; on
        failure nothing of it is left."""
        raise InvalidArgument("Devices cannot be changed while the instance is running")

    async def unplug_nic(self, name: str, device: str, nic: dict[str, str]) -> None:
        """Remove NIC `device` from running instance `name` (gone already: nothing)."""
        raise InvalidArgument("Devices cannot be changed while the instance is running")

    async def hotplug_disk(self, name: str, source: str, path: str, *, readonly: bool) -> None:
        """Mount the host path `source` at `path` inside the running instance (a disk
        device added while it runs); the instance sees the files' on-disk ids as its own,
        as it does its start-time disks. InvalidArgument if the driver cannot."""
        raise InvalidArgument("Devices cannot be changed while the instance is running")

    async def unplug_disk(self, name: str, path: str) -> None:
        """Undo hotplug_disk() (or a start-time disk's mount) at `path` in the running
        instance. InvalidArgument if the driver cannot."""
        raise InvalidArgument("Devices cannot be changed while the instance is running")

    async def move_root_disk(self, name: str, disk: str, volume: str) -> None:
        """Move the running instance's root disk to `disk` (an empty block volume of the
        same size, made by storage) while it runs, and make its definition use `disk` and
        the boot files in `volume` (the new volume's directory) from now on. Returns once
        the instance runs on `disk`; on any failure it still runs on its old disk, with
        its definition as it was. Only for drivers with `capabilities.live_disk_move`;
        the default refuses (InvalidArgument)."""
        raise InvalidArgument(f"a {self.name} instance cannot move its disk while it runs")

    @abstractmethod
    async def update_limits(self, name: str, config: dict[str, str]) -> None:
        """Apply limits.cpu / limits.memory / limits.processes from `config` (missing or
        empty = unlimited), live when running, and persist them for the next start.
        All values are validated first: on InvalidArgument nothing changes. If the kernel
        refuses a live value, the previous values are restored and the error raised."""

    async def exec(
        self,
        name: str,
        argv: builtins.list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        uid: int = 0,
        gid: int = 0,
        interactive: bool = False,
        width: int = 80,
        height: int = 24,
    ) -> ExecProcess:
        """Start `argv` inside a running instance (Conflict otherwise). `env=None` gives
        LXD's default environment; `cwd=None` the user's home (/root for root).

        Refuses an empty `argv` and fills in LXD's environment, then hands the command to
        `start_exec`, the driver's part."""
        if not argv:
            raise InvalidArgument("exec needs a command")
        run = ExecCommand(
            list(argv), exec_environment(env, uid, interactive), cwd, uid, gid, interactive,
            width, height,
        )  # fmt: skip
        return await self.start_exec(name, run)

    @abstractmethod
    async def start_exec(self, name: str, run: ExecCommand) -> ExecProcess:
        """`exec`'s work, on a command whose environment is complete: the same contract."""

    @abstractmethod
    async def push_file(
        self,
        name: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
    ) -> None:
        """Write a file inside the instance (running or stopped), replacing an existing
        file (a symlink at `path` is replaced, not followed). The parent directory must
        exist (NotFound). Symlinks on the way are resolved inside the instance's root,
        never outside it. The file appears whole or not at all: `data` goes to a temporary
        file beside it, renamed over `path` once `data` ended; when writing fails or `data`
        raises (the sender went away half-way), the temporary file is removed and what was
        at `path` stays as it was."""

    @abstractmethod
    async def pull_file(self, name: str, path: str) -> FileEntry:
        """Read a file, directory listing or symlink target from inside the instance."""

    @abstractmethod
    async def mkdir(
        self, name: str, path: str, uid: int = 0, gid: int = 0, mode: int = 0o755
    ) -> None:
        """Create a directory (its parent must exist). Conflict if `path` exists."""

    @abstractmethod
    async def delete_path(self, name: str, path: str, recursive: bool = False) -> None:
        """Remove a file, symlink or (empty unless `recursive`) directory."""

    @abstractmethod
    async def list_dir(self, name: str, path: str) -> builtins.list[str]:
        """Names in a directory inside the instance."""

    @abstractmethod
    async def console_log(self, name: str) -> bytes:
        """What the instance wrote to its console so far (b"" if nothing)."""

    @abstractmethod
    async def console(self, name: str, width: int = 80, height: int = 24) -> ExecProcess:
        """Attach to a running instance's console (Conflict otherwise): the process's pty
        carries the console's bytes both ways; `signal()` (any signal) detaches, which
        ends the process. Its exit code means nothing."""

    async def vga_console(self, name: str) -> ExecProcess:
        """A connection to the instance's VGA console (a VM's SPICE server) as a process
        whose stdin goes to it and whose stdout comes from it; it ends when its stdin is
        closed or the server hangs up."""
        raise InvalidArgument("VGA console is only supported by virtual machines")

    @abstractmethod
    async def clear_console_log(self, name: str) -> None:
        """Empty what console_log() returns."""

    @abstractmethod
    def log_path(self, name: str) -> str:
        """The driver's log file for this instance."""

    async def host_services(self) -> None:
        """Runs for the life of the service: starts and watches the host daemons the
        driver needs (libvirt's, for the qemu driver). Returns at once when there are
        none."""
        return


# name -> "module:Class"; a new driver is one more line here.
DRIVERS: Registry[InstanceDriver] = Registry(
    "instance",
    # mypy refuses an abstract class for type[T] (python/mypy#4717); the registry only
    # checks subclasses against it and instantiates the concrete classes it maps to.
    InstanceDriver,  # type: ignore[type-abstract]
    {
        "lxc": "croft.compute.drivers.lxc:LXCDriver",
        "qemu": "croft.compute.drivers.qemu:QemuDriver",
    },
)


# LXD's PATH for exec, where the caller sets none.
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def exec_environment(env: dict[str, str] | None, uid: int, interactive: bool) -> dict[str, str]:
    """The environment of a command run in an instance: LXD's defaults under what the
    caller gives (the `lxc` client sends only TERM). `env=None`: the caller gave none."""
    result = dict(env or {})
    result.setdefault("PATH", EXEC_PATH)
    if uid == 0:
        result.setdefault("HOME", "/root")
        result.setdefault("USER", "root")
    elif env is None:
        result["HOME"] = "/"
    result.setdefault("LANG", "C.UTF-8")
    if env is None and interactive:
        result["TERM"] = "xterm"
    return result


def driver_class(name: str) -> type[InstanceDriver]:
    """The driver class registered under `name` (InvalidArgument if there is none)."""
    return DRIVERS.get(name)


def load_available(
    names: Iterable[str] | None = None, **settings: object
) -> dict[str, InstanceDriver]:
    """One driver per instance type, for every registered driver (or each of `names`)
    that can run on this host, keyed by the instance type it runs. `settings` are passed
    to each driver's constructor for the keyword arguments it takes (e.g. `lxcpath`)."""
    drivers: dict[str, InstanceDriver] = {}
    wanted = list(names) if names else DRIVERS.names()
    for name in wanted:
        try:
            cls = DRIVERS.get(name)
        except ImportError as exc:  # its library is not installed here
            log.warning("instance driver %s not loaded: %s", name, exc)
            continue
        reason = cls.unavailable_reason()
        if reason is not None:
            log.warning("instance driver %s cannot run here: %s", name, reason)
            continue
        if cls.instance_type in drivers:
            raise InvalidArgument(
                f"Two instance drivers for type {cls.instance_type!r}: "
                f"{drivers[cls.instance_type].name} and {name}"
            )
        accepted = inspect.signature(cls).parameters
        drivers[cls.instance_type] = cls(**{k: v for k, v in settings.items() if k in accepted})
    return drivers


def unsupported_type(instance_type: str) -> InvalidArgument:
    """The refusal of an instance type no driver on this member runs (LXD's wording)."""
    return InvalidArgument(f'Instance type "{instance_type}" is not supported on this server')


__all__ = [
    "DRIVERS",
    "DEFAULT_INSTANCE_TYPE",
    "Capabilities",
    "ExecProcess",
    "FileEntry",
    "IdMap",
    "InstanceDriver",
    "InstanceSpec",
    "InstanceState",
    "NetworkAddress",
    "NetworkInterface",
    "Status",
    "driver_class",
    "load_available",
    "unsupported_type",
]
