"""The qemu driver: virtual machines (instance type `virtual-machine`) on QEMU, through
libvirt (`qemu:///system`; `croft.compute.virtd` keeps its daemons up).

Each instance is a persistent libvirt domain named `croft-<id>-<name>`, where `<id>` is a
digest of this driver's state directory, so that two crofts on one host (tests) never
see each other's domains. A domain outlives the compute service (libvirt owns the QEMU
process), and a new driver on the same state directory finds its domains again.

- **Accelerator.** KVM when it can run a guest: a one-off probe boots a 512-byte boot
  sector under `-accel kvm -cpu host` and waits for the byte it writes to the serial port
  (a nested PVM /dev/kvm, as on croft's test host, aborts or hangs there). Otherwise TCG
  (`<domain type='qemu'>`, `-cpu max`), with a warning in the log.
- **Boot.** Direct kernel boot from the files an image carries in its metadata tarball,
  unpacked by storage into the volume's directory (`boot/vmlinux`, `boot/initrd.img`,
  `boot/cmdline`); QEMU enters an uncompressed vmlinux through PVH. Images that need UEFI
  (LXD's own) are refused at create for now.
- **Disk.** The root block volume storage made (a raw file on a dir pool) on virtio-blk.
- **NICs.** Bridged NICs become a tap on the network's bridge (userspace virtio-net: this
  host has no vhost-net); the tap's name is derived from the domain and device names.
- **Agent and console.** A virtio-serial port `org.croft.agent.0` on a unix socket in the
  instance's directory (see croft.imageformat.vmimage for the line protocol), and the
  serial console on another, logged to `console.log`.
- **Stop.** ACPI power-down (`virDomainShutdown`) with LXD's timeout semantics: a guest
  still running after `timeout` is left running and the stop fails with LXD's "Instance
  was not shutdown after timeout"; `force` (or a zero timeout) destroys at once. Freeze/unfreeze pause and resume the
  vCPUs.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
import tty
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import libvirt
import libvirt_qemu

from croft.common.blocking import in_thread
from croft.common.errors import Conflict, Internal, InvalidArgument, NotFound
from croft.common.instance_config import InstanceConfig
from croft.common.revert import Reverter
from croft.compute import guest_agent, virtd
from croft.compute.agent_client import (
    AGENT_DOWN,
    AgentConnection,
    AgentExecProcess,
    connection_for,
    drop_connection,
)
from croft.compute.drivers import (
    Capabilities,
    ExecCommand,
    ExecProcess,
    FileEntry,
    InstanceDriver,
    InstanceSpec,
    InstanceState,
    NetworkAddress,
    NetworkInterface,
    Status,
)
from croft.compute.limits import host_memory_bytes, parse_limits

log = logging.getLogger(__name__)

# libvirt prints every error to stderr unless told otherwise; croft raises its own.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

URI = "qemu:///system"
EMULATOR = "qemu-system-x86_64"
AGENT_PORT = "org.croft.agent.0"
DEFAULT_MEMORY = 1024**3  # LXD's default limits.memory for VMs
BOOT_DIR = "boot"
OVMF_DIR = "/usr/share/OVMF"  # Debian's ovmf: UEFI for images that boot from their disk
KVM_PROBE_TIMEOUT = 5.0
STOP_POLL = 0.2
AGENT_TIMEOUT = 30.0
EXEC_TIMEOUT = 3600.0
STATE_TIMEOUT = 5.0
ACPI_GRACE = 5.0
BALLOON_WAIT = 30.0
BALLOON_POLL = 0.5
CPU_ONLINE_WAIT = 30.0
CPU_ONLINE_POLL = 0.5
# The vCPU count last applied to a running VM (the instance's directory; gone at start).
LIVE_VCPUS = "live-vcpus"
TCG_TB_CACHE_MIB = 32
FILE_TIMEOUT = 600.0
# A live disk move: the mirror's copy may take long on a big disk; this only catches hangs.
MIRROR_TIMEOUT = 3600.0
MIRROR_POLL = 0.2
ROOT_TARGET = "vda"
# Guest files pushed in parts of this size (each a frame on the agent's port).
PUT_CHUNK = 256 * 1024

# libvirt domain states -> LXD's statuses.
_STATUS = {
    libvirt.VIR_DOMAIN_RUNNING: Status.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: Status.RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: Status.RUNNING,  # shutting down
    libvirt.VIR_DOMAIN_PAUSED: Status.FROZEN,
    libvirt.VIR_DOMAIN_PMSUSPENDED: Status.FROZEN,
    libvirt.VIR_DOMAIN_SHUTOFF: Status.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: Status.STOPPED,
}

# mov dx,0x3f8; mov al,'K'; out dx,al; hlt; jmp $-1 -- then the boot signature.
_PROBE_SECTOR = (
    bytes.fromhex("baf803b04bee f4ebfd".replace(" ", "")).ljust(510, b"\0") + b"\x55\xaa"
)


@functools.cache
def kvm_usable() -> bool:
    """Whether KVM can run a guest here (cached for the process). Blocking, at most
    KVM_PROBE_TIMEOUT seconds."""
    if not os.path.exists("/dev/kvm") or shutil.which(EMULATOR) is None:
        return False
    with tempfile.NamedTemporaryFile(prefix="croft-kvm-probe-", suffix=".img") as disk:
        disk.write(_PROBE_SECTOR)
        disk.flush()
        # The probe guest dies with the compute that runs it: a compute killed mid-probe
        # (its fault tests do that) left it spinning forever where KVM cannot run guests.
        argv = [
            "setpriv", "--pdeathsig", "KILL", "--",
            EMULATOR, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "16",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-drive", f"file={disk.name},format=raw,if=ide",
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError:
            return False
        try:
            out, err = proc.communicate(timeout=KVM_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if b"K" in out:
            if proc.poll() is None:
                proc.kill()
            return True
        why = err.decode(errors="replace").strip().splitlines()
        log.warning(
            "KVM cannot run guests here (%s): virtual machines run under TCG (emulation, "
            "much slower)",
            why[0] if why else "no output from the probe guest",
        )
        return False


# The console helper: relays its stdin/stdout (a pty) to and from the serial console's
# unix socket until either end closes.
_CONSOLE_RELAY = r"""
import os, selectors, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError:
    sys.exit(1)
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ)
sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj == 0:
            data = os.read(0, 65536)
            if not data:
                sys.exit(0)
            s.sendall(data)
        else:
            data = s.recv(65536)
            if not data:
                sys.exit(0)
            os.write(1, data)
"""


class ConsoleProcess(ExecProcess):
    """The console helper on its pty; any signal detaches (kills the helper)."""

    def __init__(self, process: asyncio.subprocess.Process, master: int) -> None:
        self._process = process
        self.pid = process.pid
        self.pty = master
        self.stdin = self.stdout = self.stderr = None

    async def wait(self) -> int:
        return await self._process.wait()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    def resize(self, width: int, height: int) -> None:
        if self.pty is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self) -> None:
        if self.pty is not None:
            with contextlib.suppress(OSError):
                os.close(self.pty)
            self.pty = None


class RelayProcess(ConsoleProcess):
    """The socket helper on pipes (a binary stream, no terminal): its stdin goes to the
    socket, its stdout comes from it; any signal ends it."""

    def __init__(
        self, process: asyncio.subprocess.Process, stdin: int, stdout: int, stderr: int
    ) -> None:
        self._process = process
        self.pid = process.pid
        self.pty = None
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def close(self) -> None:
        for attr in ("stdin", "stdout", "stderr"):
            fd = getattr(self, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, None)


def _domain_prefix(vmpath: str) -> str:
    return "croft-" + hashlib.sha256(os.path.realpath(vmpath).encode()).hexdigest()[:8] + "-"


def _tap_name(domain: str, device: str) -> str:
    return "vm" + hashlib.sha256(f"{domain}/{device}".encode()).hexdigest()[:11]


def _memory_bytes(config: dict[str, str]) -> int:
    memory = parse_limits(config).memory_bytes or DEFAULT_MEMORY
    if memory > host_memory_bytes():
        raise InvalidArgument(
            f'Invalid value for limits.memory "{config.get("limits.memory", "")}": more '
            "than this host's memory"
        )
    return memory


def _vcpus(config: dict[str, str]) -> int:
    cpu = parse_limits(config).cpu
    if cpu is None:
        return 1
    if cpu.count is not None:
        return cpu.count
    return len(cpu.cpus or ()) or 1


def _qmp(dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """A QMP command to the VM's QEMU through libvirt (which marks the domain tainted
    "custom-monitor"), and its `return`."""
    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))
    except libvirt.libvirtError as exc:
        raise Internal(f"QEMU: {exc}") from None
    if "error" in reply:
        raise Internal(f"QEMU: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


def _vcpu_elements(root: ET.Element, vcpus: int) -> None:
    """`<vcpu>`/`<vcpus>` for `vcpus` running vCPUs out of the host's CPU count (LXD's
    `maxcpus`; more when asked for more): vCPU 0 fixed, the others hot-pluggable, so that
    limits.cpu can change both ways while the VM runs."""
    for tag in ("vcpu", "vcpus"):
        for old in root.findall(tag):
            root.remove(old)
    maximum = max(os.cpu_count() or 1, vcpus)
    ET.SubElement(root, "vcpu", placement="static", current=str(vcpus)).text = str(maximum)
    if maximum == 1:
        return
    table = ET.SubElement(root, "vcpus")
    for i in range(maximum):
        el = ET.SubElement(table, "vcpu", id=str(i), enabled="yes" if i < vcpus else "no")
        el.set("hotpluggable", "no" if i == 0 else "yes")
        if i < vcpus:
            el.set("order", str(i + 1))


# The configuration drive's files for guests that boot with systemd (Debian images): the
# unit, its setup script and install.sh, after LXD's lxd-agent-loader.
CONFIG_DRIVE = "config"
_AGENT_UNIT = """[Unit]
Description=croft - agent
Documentation=https://github.com/canonical/lxd/tree/main/lxd-agent
ConditionPathExists=/dev/virtio-ports/org.croft.agent.0
Before=cloud-init.target cloud-init.service cloud-init-local.service
DefaultDependencies=no

[Service]
Type=simple
WorkingDirectory=-/run/croft_agent
ExecStartPre=/lib/systemd/croft-agent-setup
ExecStart=/usr/bin/python3 -S -E /run/croft_agent/croft-agent.py
Restart=on-failure
RestartSec=5s
StartLimitInterval=60
StartLimitBurst=10
"""
_AGENT_SETUP = """#!/bin/sh
set -eu
PREFIX="/run/croft_agent"
# Mount the config drive, copy the agent out, unmount (LXD's lxd-agent-setup).
mkdir -p "${PREFIX}/.mnt"
mount -t tmpfs tmpfs "${PREFIX}" -o mode=0700,size=50M
mkdir -p "${PREFIX}/.mnt"
mount -t 9p config "${PREFIX}/.mnt" -o ro,access=0,trans=virtio,version=9p2000.L
cp "${PREFIX}/.mnt/croft-agent.py" "${PREFIX}/"
umount "${PREFIX}/.mnt"
rmdir "${PREFIX}/.mnt"
"""
_AGENT_RULE = (
    'ACTION=="add", SYMLINK=="virtio-ports/org.croft.agent.0", '
    'TAG+="systemd", ENV{SYSTEMD_WANTS}+="croft-agent.service"\n'
)
_INSTALL = """#!/bin/sh
# Installs croft's agent loader into a systemd guest (mount the config drive, run this).
set -eu
cd "$(dirname "$0")"
cp croft-agent.service /lib/systemd/system/
cp croft-agent-setup /lib/systemd/
chmod 0755 /lib/systemd/croft-agent-setup
cp 99-croft-agent.rules /lib/udev/rules.d/
systemctl daemon-reload
systemctl enable croft-agent.service
echo "croft-agent installed"
"""


def config_drive_files() -> dict[str, str]:
    """The files of a VM's configuration drive, by name."""
    return {
        "croft-agent.py": Path(guest_agent.__file__).read_text(),
        "croft-agent.service": _AGENT_UNIT,
        "croft-agent-setup": _AGENT_SETUP,
        "99-croft-agent.rules": _AGENT_RULE,
        "install.sh": _INSTALL,
    }


def _agent_error(answer: dict[str, Any], path: str) -> Exception:
    """croft's error for the agent's `error` answer."""
    code = int(answer.get("errno") or 0)
    message = str(answer.get("msg") or "the VM agent failed")
    if code == errno.ENOENT:
        return NotFound(f'"{path}" not found in the instance' if path else message)
    if code == errno.EEXIST:
        return Conflict(f'"{path}" already exists in the instance')
    if code == errno.ENOTEMPTY:
        return Conflict(f'Directory "{path}" is not empty')
    return InvalidArgument(message)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    parts = []
    while data := os.read(fd, 65536):
        parts.append(data)
    return b"".join(parts)


def _extra_disk(devices: ET.Element, dev_name: str, device: dict[str, str], index: int) -> None:
    """A disk device beyond the root disk: a block source (a custom block volume, a host
    block device or image file) is a virtio disk whose serial is the device's name (as
    LXD's `lxd_<name>`: /dev/disk/by-id/virtio-croft_<name> in the guest); a directory
    (a host path or a custom filesystem volume) is shared with the guest over 9p,
    with the device's name as its mount tag (`mount -t 9p -o trans=virtio <name> <path>`)."""
    source = device.get("source", "")
    if not source or not os.path.isabs(source):
        raise InvalidArgument(f'Device "{dev_name}": a disk needs an absolute source')
    readonly = device.get("readonly", "").lower() in ("true", "1", "yes", "on")
    if os.path.isdir(source):
        if not device.get("path"):
            raise InvalidArgument(f'Device "{dev_name}": a shared directory needs a path')
        fs = ET.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
        ET.SubElement(fs, "driver", type="path")
        ET.SubElement(fs, "source", dir=source)
        ET.SubElement(fs, "target", dir=dev_name[:31])
        if readonly:
            ET.SubElement(fs, "readonly")
        return
    if not os.path.exists(source):
        raise InvalidArgument(f'Device "{dev_name}": missing source "{source}"')
    is_block = Path(source).is_block_device()
    disk_el = ET.SubElement(devices, "disk", type="block" if is_block else "file")
    disk_el.set("device", "disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="raw", discard="unmap")
    ET.SubElement(disk_el, "source", {"dev": source} if is_block else {"file": source})
    ET.SubElement(disk_el, "target", dev="vd" + chr(ord("a") + index), bus="virtio")
    ET.SubElement(disk_el, "serial").text = f"croft_{dev_name}"[:20]
    if readonly:
        ET.SubElement(disk_el, "readonly")


class QemuDriver(InstanceDriver):
    name: ClassVar[str] = "qemu"
    instance_type: ClassVar[str] = "virtual-machine"
    capabilities: ClassVar[Capabilities] = Capabilities(
        live_limits=True,
        freeze=True,
        exec=True,
        console_log=True,
        files_when_stopped=False,
        privileged=False,
        survives_service_restart=True,
        live_disk_move=True,
    )

    def __init__(
        self,
        vmpath: str = "/var/lib/croft/virtual-machines",
        log_dir: str = "/var/log/croft",
        uri: str = URI,
        ovmf_dir: str = OVMF_DIR,
    ) -> None:
        self.vmpath = vmpath
        self.ovmf_dir = ovmf_dir
        self.log_dir = log_dir
        self.uri = uri
        self.prefix = _domain_prefix(vmpath)
        os.makedirs(vmpath, mode=0o711, exist_ok=True)
        self._conn: libvirt.virConnect | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if shutil.which(EMULATOR) is None:
            return f"{EMULATOR} is not installed"
        if shutil.which("libvirtd") is None:
            return "libvirtd is not installed"
        return None

    async def host_services(self) -> None:
        # The KVM probe (up to 5 s) now, not in the first launch.
        probe = asyncio.ensure_future(in_thread(kvm_usable))
        try:
            await virtd.supervise(Path(self.vmpath), Path(self.log_dir))
        finally:
            probe.cancel()

    # -- helpers (blocking ones run in a thread)

    def _connection(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None or not conn.isAlive():
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise Internal(f"cannot connect to libvirt at {self.uri}: {exc}") from None
            self._conn = conn
        return conn

    def domain_name(self, name: str) -> str:
        return self.prefix + name

    def instance_dir(self, name: str) -> Path:
        return Path(self.vmpath) / name

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self._connection().lookupByName(self.domain_name(name))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f'Instance "{name}" not found') from None
            raise Internal(f"libvirt: {exc}") from None

    def _status(self, name: str) -> Status:
        state, _reason = self._lookup(name).state()
        return _STATUS.get(state, Status.ERROR)

    def _domain_xml(self, spec: InstanceSpec, disk: str, old: ET.Element | None) -> str:
        """The libvirt definition of `spec`; `old` (a previous definition) gives what the
        spec may leave out: the disk and boot files."""
        for key, value in spec.config.items():
            if any(c in value for c in "\0\n\r") and not key.startswith("raw."):
                raise InvalidArgument(f'Invalid value for "{key}": control characters')
        memory = _memory_bytes(spec.config)
        vcpus = _vcpus(spec.config)
        volume = Path(spec.volume) if spec.volume else None
        boot = volume / BOOT_DIR if volume else None
        kernel = initrd = cmdline = ""
        if boot is not None and (boot / "vmlinux").is_file():
            kernel = str(boot / "vmlinux")
            if (boot / "initrd.img").is_file():
                initrd = str(boot / "initrd.img")
            if (boot / "cmdline").is_file():
                cmdline = (boot / "cmdline").read_text().strip()
        elif old is not None:
            kernel = old.findtext("os/kernel") or ""
            initrd = old.findtext("os/initrd") or ""
            cmdline = old.findtext("os/cmdline") or ""
        config = InstanceConfig(spec.config)
        if kernel and spec.config.get("security.secureboot", "").lower() in (
            "true",
            "1",
            "yes",
            "on",
        ):
            raise InvalidArgument(
                "security.secureboot cannot apply to this image: it boots its kernel directly, "
                "not through UEFI (unset security.secureboot or use a UEFI image)"
            )
        firmware = None
        if not kernel:
            secureboot = config.bool("security.secureboot")
            if secureboot and spec.config.get("image.requirements.secureboot") == "false":
                raise InvalidArgument(
                    "The image used by this instance is incompatible with secureboot. Please "
                    "set security.secureboot=false on the instance"
                )
            firmware = self._firmware(secureboot)
        if not disk and old is not None:
            source = old.find("devices/disk/source")
            if source is not None:
                disk = source.get("file") or source.get("dev") or ""
        if not disk:
            raise InvalidArgument("The root disk has no block volume")
        domain = self.domain_name(spec.name)
        kvm = kvm_usable()
        root = ET.Element("domain", type="kvm" if kvm else "qemu")
        ET.SubElement(root, "name").text = domain
        instance_uuid = spec.config.get("volatile.uuid")
        with contextlib.suppress(ValueError):  # libvirt makes one up otherwise
            parsed = uuid.UUID(instance_uuid or "")
            ET.SubElement(root, "uuid").text = str(parsed)
        ET.SubElement(root, "title").text = spec.name
        ET.SubElement(root, "memory", unit="b").text = str(memory)
        ET.SubElement(root, "currentMemory", unit="b").text = str(memory)
        _vcpu_elements(root, vcpus)
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
        features = ET.SubElement(root, "features")
        ET.SubElement(features, "acpi")  # without it a guest's poweroff only halts
        if not kvm:
            # TCG's translation cache defaults to 1 GiB and fills as the guest runs: the
            # bulk of an idle VM's host memory beyond its RAM. A small one costs little
            # retranslation for these guests.
            tcg = ET.SubElement(features, "tcg")
            ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(TCG_TB_CACHE_MIB)
        if firmware is not None:
            # UEFI from the disk's ESP: OVMF read-only, a per-VM copy of its variables
            # (one per secure-boot mode, so switching starts from that mode's template).
            code, template, secure = firmware
            loader = ET.SubElement(os_el, "loader", readonly="yes", type="pflash")
            loader.set("secure", "yes" if secure else "no")
            loader.text = code
            nvram = self.instance_dir(spec.name) / ("nvram-secureboot.fd" if secure else "nvram.fd")
            ET.SubElement(os_el, "nvram", template=template).text = str(nvram)
            if secure:
                ET.SubElement(features, "smm", state="on")  # OVMF's secure boot needs SMM
        else:
            ET.SubElement(os_el, "kernel").text = kernel
            if initrd:
                ET.SubElement(os_el, "initrd").text = initrd
            if cmdline:
                ET.SubElement(os_el, "cmdline").text = cmdline
        if kvm:
            ET.SubElement(root, "cpu", mode="host-passthrough")
        else:
            ET.SubElement(root, "cpu", mode="maximum", check="none")
        ET.SubElement(root, "clock", offset="utc")
        ET.SubElement(root, "on_poweroff").text = "destroy"
        ET.SubElement(root, "on_reboot").text = "restart"
        ET.SubElement(root, "on_crash").text = "destroy"
        devices = ET.SubElement(root, "devices")
        ET.SubElement(devices, "emulator").text = shutil.which(EMULATOR) or EMULATOR
        is_block = Path(disk).is_block_device()
        disk_el = ET.SubElement(devices, "disk", type="block" if is_block else "file")
        disk_el.set("device", "disk")
        ET.SubElement(disk_el, "driver", name="qemu", type="raw", discard="unmap")
        ET.SubElement(disk_el, "source", {"dev": disk} if is_block else {"file": disk})
        ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
        if firmware is not None:
            ET.SubElement(disk_el, "boot", order="1")
        extra_disks = 0
        for dev_name, device in sorted(spec.devices.items()):
            kind = device.get("type")
            if kind == "disk":
                if device.get("path") == "/":
                    continue
                extra_disks += 1
                _extra_disk(devices, dev_name, device, extra_disks)
                continue
            if kind != "nic":
                raise InvalidArgument(
                    f'Device "{dev_name}": devices of type "{kind}" are not supported on '
                    "virtual machines yet"
                )
            nictype = device.get("nictype", "")
            parent = device.get("parent", "")
            if nictype not in ("bridged", "macvlan") or not parent:
                raise InvalidArgument(
                    f'Device "{dev_name}": only bridged and macvlan NICs are supported on '
                    "virtual machines yet"
                )
            if nictype == "macvlan":
                # LXD's macvlan NIC for a VM: a macvtap on the parent in bridge mode, its
                # tap device opened by QEMU (libvirt's "direct" interface).
                if not os.path.exists(f"/sys/class/net/{parent}"):
                    raise InvalidArgument(
                        f'Device "{dev_name}": parent interface "{parent}" not found'
                    )
                nic = ET.SubElement(devices, "interface", type="direct")
                ET.SubElement(nic, "source", dev=parent, mode="bridge")
            else:
                nic = ET.SubElement(devices, "interface", type="bridge")
                ET.SubElement(nic, "source", bridge=parent)
            if device.get("hwaddr"):
                ET.SubElement(nic, "mac", address=device["hwaddr"])
            ET.SubElement(nic, "model", type="virtio")
            ET.SubElement(nic, "driver", name="qemu")  # no vhost-net on every host
            ET.SubElement(nic, "target", dev=_tap_name(domain, dev_name))
            if device.get("mtu"):
                ET.SubElement(nic, "mtu", size=device["mtu"])
            ET.SubElement(nic, "alias", name=f"ua-nic-{dev_name}")
        directory = self.instance_dir(spec.name)
        serial = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(serial, "source", mode="bind", path=str(directory / "console.sock"))
        ET.SubElement(serial, "log", file=str(directory / "console.log"), append="on")
        ET.SubElement(serial, "target", port="0")
        # The configuration drive (LXD's `config` share): the agent and its loader files.
        share = ET.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
        ET.SubElement(share, "driver", type="path")
        ET.SubElement(share, "source", dir=str(directory / CONFIG_DRIVE))
        ET.SubElement(share, "target", dir="config")
        ET.SubElement(share, "readonly")
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=str(directory / "agent.sock"))
        ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT)
        # LXD's VGA console: a virtio GPU shown by a SPICE server on a unix socket.
        graphics = ET.SubElement(devices, "graphics", type="spice")
        ET.SubElement(graphics, "listen", type="socket", socket=str(directory / "spice.sock"))
        ET.SubElement(graphics, "image", compression="off")
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="virtio", heads="1", primary="yes")
        # A balloon, as LXD's: limits.memory lowered on a running VM shrinks the guest.
        ET.SubElement(devices, "memballoon", model="virtio")
        # QEMU runs as root and libvirt leaves the files' owners alone: the disk belongs
        # to storage, the boot files to the image.
        seclabel = ET.SubElement(root, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(seclabel, "label").text = "+0:+0"
        return ET.tostring(root, encoding="unicode")

    def _firmware(self, secureboot: bool) -> tuple[str, str, bool]:
        """OVMF's code and variables template for a UEFI boot: (code, vars, secure).
        Refused clearly when the firmware is not installed."""
        names = (
            ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd")
            if secureboot
            else ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
        )
        paths = [Path(self.ovmf_dir) / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            mode = "with secure boot " if secureboot else ""
            raise InvalidArgument(
                f"Required EFI firmware {mode}is missing: {', '.join(missing)} (install the "
                "ovmf package" + (", or set security.secureboot=false" if secureboot else "") + ")"
            )
        return str(paths[0]), str(paths[1]), secureboot

    def _old_definition(self, name: str) -> ET.Element | None:
        try:
            dom = self._lookup(name)
        except NotFound:
            return None
        return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    # -- lifecycle

    async def create(self, spec: InstanceSpec) -> None:
        await in_thread(self._create, spec)

    def _create(self, spec: InstanceSpec) -> None:
        xml = self._domain_xml(spec, spec.disk, None)
        if self._old_definition(spec.name) is not None:
            raise Conflict(f'Instance "{spec.name}" already exists')
        directory = self.instance_dir(spec.name)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._connection().defineXML(xml)
        except libvirt.libvirtError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise InvalidArgument(f"libvirt refused the definition: {exc}") from None

    async def redefine(self, spec: InstanceSpec) -> None:
        await in_thread(self._redefine, spec)

    def _redefine(self, spec: InstanceSpec) -> None:
        old = self._old_definition(spec.name)
        if old is None:
            raise NotFound(f'Instance "{spec.name}" not found')
        xml = self._domain_xml(spec, spec.disk, old)
        if self._status(spec.name) is not Status.STOPPED:
            raise Conflict(f'Instance "{spec.name}" is running')
        try:
            self._connection().defineXML(xml)
        except libvirt.libvirtError as exc:
            raise InvalidArgument(f"libvirt refused the definition: {exc}") from None

    async def start(self, name: str, before: Callable[[Status], None] | None = None) -> None:
        await in_thread(self._start, name, before)

    def _start(self, name: str, before: Callable[[Status], None] | None) -> None:
        dom = self._lookup(name)
        status = self._status(name)
        if before is not None:
            before(status)
        if status is not Status.STOPPED:
            raise Conflict(f'Instance "{name}" is already running')
        directory = self.instance_dir(name)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sock in ("console.sock", "agent.sock", LIVE_VCPUS):
            (directory / sock).unlink(missing_ok=True)
        self._write_config_drive(directory / CONFIG_DRIVE)
        self._forget_agent(name)
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise Internal(f"Failed to start the virtual machine: {exc}") from None

    @staticmethod
    def _write_config_drive(drive: Path) -> None:
        """This croft's agent on the VM's configuration drive, at each start: a guest
        loader runs what it finds there, so a croft update updates the agent."""
        drive.mkdir(mode=0o700, exist_ok=True)
        for name, text in config_drive_files().items():
            tmp = drive / f".{name}.tmp"
            tmp.write_text(text)
            tmp.chmod(0o755 if name.endswith((".sh", "-setup")) else 0o644)
            os.replace(tmp, drive / name)

    async def stop(self, name: str, force: bool = False, timeout: float = 30.0) -> None:
        dom = await in_thread(self._lookup, name)
        if await self.status(name) is Status.STOPPED:
            raise Conflict(f'Instance "{name}" is already stopped')
        if not force and timeout != 0:
            with contextlib.suppress(libvirt.libvirtError):  # stopped meanwhile
                await in_thread(dom.shutdown)  # ACPI power button
            # LXD's Shutdown(): wait for the guest to power off; a guest that has not
            # after `timeout` is left running and the stop fails (a negative timeout
            # waits for ever). Only `force` (or a zero timeout) pulls the plug.
            # Beyond LXD: a guest that ignores the button (no ACPI handler running) is
            # asked through its agent after ACPI_GRACE seconds, still a clean shutdown.
            started = time.monotonic()
            deadline = started + timeout if timeout > 0 else None
            asked_agent = False
            while deadline is None or time.monotonic() < deadline:
                if await self.status(name) is Status.STOPPED:
                    self._forget_agent(name)
                    return
                if not asked_agent and time.monotonic() - started > ACPI_GRACE:
                    asked_agent = True
                    with contextlib.suppress(Conflict, TimeoutError):
                        async with asyncio.timeout(STATE_TIMEOUT):
                            await self.shutdown_through_agent(name)
                await asyncio.sleep(STOP_POLL)
            raise Internal("Instance was not shutdown after timeout")
        self._forget_agent(name)
        await in_thread(self._destroy, dom)

    @staticmethod
    def _destroy(dom: libvirt.virDomain) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if dom.isActive():
                raise Internal(f"Failed to stop the virtual machine: {exc}") from None

    async def restart(self, name: str, force: bool = False, timeout: float = 30.0) -> None:
        await self.stop(name, force=force, timeout=timeout)
        await self.start(name)

    async def freeze(self, name: str) -> None:
        await in_thread(self._freeze, name, True)
        self._forget_agent(name)  # a paused guest's agent cannot answer: see _agent

    async def unfreeze(self, name: str) -> None:
        await in_thread(self._freeze, name, False)

    def _freeze(self, name: str, freeze: bool) -> None:
        dom = self._lookup(name)
        status = self._status(name)
        if freeze and status is not Status.RUNNING:
            raise Conflict(f'Instance "{name}" is not running')
        if not freeze and status is not Status.FROZEN:
            raise Conflict(f'Instance "{name}" is not frozen')
        try:
            dom.suspend() if freeze else dom.resume()
        except libvirt.libvirtError as exc:
            raise Internal(f"libvirt: {exc}") from None

    async def delete(self, name: str) -> None:
        await in_thread(self._delete, name)

    def _delete(self, name: str) -> None:
        dom = self._lookup(name)
        self._forget_agent(name)
        if dom.isActive():
            raise Conflict(f'Instance "{name}" is running')
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise Internal(f"libvirt: {exc}") from None
        shutil.rmtree(self.instance_dir(name), ignore_errors=True)
        # libvirt's own log of the domain (QEMU's command line and stderr), rotations too.
        log_file = Path(self.log_path(name))
        for old in log_file.parent.glob(log_file.name + "*"):
            old.unlink(missing_ok=True)

    async def list(self) -> builtins.list[str]:
        def names() -> builtins.list[str]:
            return sorted(
                dom.name()[len(self.prefix) :]
                for dom in self._connection().listAllDomains()
                if dom.name().startswith(self.prefix)
            )

        return await in_thread(names)

    async def exists(self, name: str) -> bool:
        try:
            await in_thread(self._lookup, name)
        except NotFound:
            return False
        return True

    async def status(self, name: str) -> Status:
        return await in_thread(self._status, name)

    async def active(self) -> frozenset[str] | None:
        def running() -> frozenset[str]:
            flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
            return frozenset(
                dom.name()[len(self.prefix) :]
                for dom in self._connection().listAllDomains(flags)
                if dom.name().startswith(self.prefix)
            )

        return await in_thread(running)

    async def state(self, name: str) -> InstanceState:
        state = await in_thread(self._state, name)
        if state.status is Status.RUNNING:
            await self._guest_state(name, state)
        return state

    async def _guest_state(self, name: str, state: InstanceState) -> None:
        """Processes, memory and the network as the guest sees them, from its agent (LXD's
        renderState with its agent); without an answer within STATE_TIMEOUT the host's
        view stays (processes -1, no addresses), as LXD's without its agent."""
        try:
            async with asyncio.timeout(STATE_TIMEOUT):
                guest = await self._ask(name, {"t": "state"})
        except (Conflict, TimeoutError):
            return
        state.processes = int(guest.get("processes", -1))
        state.memory_usage = int(guest.get("memory_usage", state.memory_usage))
        by_mac = {nic.hwaddr.lower(): nic for nic in state.network.values() if nic.hwaddr}
        network: dict[str, NetworkInterface] = {}
        for dev, info in sorted((guest.get("network") or {}).items()):
            host = by_mac.get(str(info.get("hwaddr", "")).lower())
            network[dev] = NetworkInterface(
                name=dev,
                addresses=[
                    NetworkAddress(
                        family=str(a["family"]),
                        address=str(a["address"]),
                        netmask=str(a["netmask"]),
                        scope=str(a["scope"]),
                    )  # fmt: skip
                    for a in info.get("addresses", [])
                ],
                hwaddr=str(info.get("hwaddr", "")),
                host_name=host.host_name if host is not None else "",
                mtu=int(info.get("mtu", 1500)),
                state=str(info.get("state", "up")),
                type=str(info.get("type", "broadcast")),
                bytes_received=int(info.get("bytes_received", 0)),
                bytes_sent=int(info.get("bytes_sent", 0)),
                packets_received=int(info.get("packets_received", 0)),
                packets_sent=int(info.get("packets_sent", 0)),
            )
        state.network = network

    def _state(self, name: str) -> InstanceState:
        dom = self._lookup(name)
        state, _max_kib, _mem_kib, _vcpus, cpu_ns = dom.info()
        status = _STATUS.get(state, Status.ERROR)
        if status is Status.STOPPED:
            return InstanceState(status=status, pid=0)
        pid = 0
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(f"/run/libvirt/qemu/{dom.name()}.pid").read_text().strip())
        rss = 0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        live = ET.fromstring(dom.XMLDesc(0))
        memory_limit = int(live.findtext("memory") or 0) * 1024  # KiB in the live XML
        network: dict[str, NetworkInterface] = {}
        for nic in live.findall("devices/interface"):
            alias_el = nic.find("alias")
            alias = alias_el.get("name", "") if alias_el is not None else ""
            dev_name = alias.removeprefix("ua-nic-") or "eth0"
            target = nic.find("target")
            tap = target.get("dev", "") if target is not None else ""
            mac = nic.find("mac")
            mtu_el = nic.find("mtu")
            counters: Any = (0, 0, 0, 0, 0, 0, 0, 0)
            with contextlib.suppress(libvirt.libvirtError):
                counters = dom.interfaceStats(tap)
            network[dev_name] = NetworkInterface(
                name=dev_name,
                addresses=[],
                hwaddr=mac.get("address", "") if mac is not None else "",
                host_name=tap,
                mtu=int(mtu_el.get("size", "1500")) if mtu_el is not None else 1500,
                state="up",
                type="broadcast",
                bytes_received=counters[0],
                packets_received=counters[1],
                bytes_sent=counters[4],
                packets_sent=counters[5],
            )
        return InstanceState(
            status=status,
            pid=pid,
            processes=-1,  # only the guest agent could tell (LXD's -1 without it)
            memory_usage=rss,
            memory_limit=memory_limit,
            cpu_usage_ns=cpu_ns,
            network=network,
        )

    async def update_limits(self, name: str, config: dict[str, str]) -> None:
        """limits.cpu and limits.memory as LXD 5.0 applies them (its qemu driver's
        Update): written for the next start, and on a running VM also live.

        - CPUs: the VM boots with vCPU 0 fixed and up to the host's CPU count pluggable
          (LXD's `maxcpus`); more CPUs are hot-plugged (QMP device_add, as LXD's
          setCPUs) and brought online in the guest by its agent (Ubuntu's guests do that
          with a udev rule). Fewer are taken offline in the guest, not unplugged: on this
          QEMU (7.2, TCG) plugging a vCPU back into a slot it was unplugged from crashed
          the VM, and libvirt's own unplug gives the guest's ACPI eject 5 s, after which
          its record of the vCPUs stays wrong. The next start applies the count exactly.
        - Memory shrinks through the balloon and grows back up to the size the VM booted
          with, not beyond (LXD's error)."""
        memory = _memory_bytes(config)
        vcpus = _vcpus(config)
        if await self.status(name) is not Status.STOPPED:
            if await in_thread(self._live_vcpus, name, config, vcpus):
                await self._guest_cpus(name, vcpus)
            await self._live_memory(name, memory)
        await in_thread(self._set_limits, name, memory, vcpus)

    def _live_vcpus(self, name: str, config: dict[str, str], vcpus: int) -> bool:
        """Plug vCPUs until the running VM has at least `vcpus`; False when `vcpus` is
        what it runs with already (as booted, or as last changed live)."""
        dom = self._lookup(name)
        applied = self.instance_dir(name) / LIVE_VCPUS
        try:
            current = int(applied.read_text())
        except (OSError, ValueError):
            live = ET.fromstring(dom.XMLDesc(0)).find("vcpu")
            current = int((live.get("current") or live.text or 1) if live is not None else 1)
        if current == vcpus:
            return False
        cpu = parse_limits(config).cpu
        if cpu is not None and cpu.count is None:
            raise InvalidArgument("Cannot change CPU pinning when VM is running")
        cpus = _qmp(dom, "query-hotpluggable-cpus")
        if vcpus > len(cpus):
            raise InvalidArgument(
                "Failed updating cpu limit: Cannot allocate more CPUs than available"
            )
        plugged = sum(1 for c in cpus if c.get("qom-path"))
        for free in [c for c in cpus if not c.get("qom-path")][: max(0, vcpus - plugged)]:
            props = free["props"]
            dev_id = "cpu" + "".join(
                str(props.get(k, 0)) for k in ("socket-id", "core-id", "thread-id")
            )
            _qmp(dom, "device_add", {"id": dev_id, "driver": free["type"], **props})
        applied.write_text(str(vcpus))
        return True

    async def _guest_cpus(self, name: str, vcpus: int) -> None:
        """CPUs 0..vcpus-1 online in the guest and the others offline, through its agent,
        until the guest counts `vcpus` (a hot-plugged CPU shows up after an ACPI
        notification); a guest without a running agent is left as is."""
        script = (
            "i=0; while [ -d /sys/devices/system/cpu/cpu$i ]; do "
            "f=/sys/devices/system/cpu/cpu$i/online; "
            f"if [ -f $f ]; then if [ $i -lt {vcpus} ]; then w=1; else w=0; fi; "
            '[ "$(cat $f)" = $w ] || echo $w > $f 2>/dev/null; fi; '
            "i=$((i+1)); done; grep -c ^processor /proc/cpuinfo"
        )
        deadline = time.monotonic() + CPU_ONLINE_WAIT
        while time.monotonic() < deadline:
            try:
                rc, out, _ = await self.agent_exec(name, script, timeout=STATE_TIMEOUT)
            except Conflict:
                return
            if rc == 0 and out.strip() == str(vcpus).encode():
                return
            await asyncio.sleep(CPU_ONLINE_POLL)
        log.warning("%s: the guest does not count %d CPUs", name, vcpus)

    async def _live_memory(self, name: str, memory: int) -> None:
        """LXD's updateMemoryLimit: the balloon to `memory`, no higher than the boot-time
        size, waited for until within 1% of the target."""
        new_mib = memory // 1024**2
        dom = await in_thread(self._lookup, name)
        _, max_kib, cur_kib, _, _ = await in_thread(dom.info)
        base_mib, cur_mib = max_kib // 1024, cur_kib // 1024
        if cur_mib == new_mib:
            return
        if base_mib < new_mib:
            raise InvalidArgument(
                "Failed updating memory limit: Cannot increase memory size beyond boot time "
                f"size when VM is running (Boot time size {base_mib}MiB, new size "
                f"{new_mib}MiB)"
            )
        try:
            await in_thread(dom.setMemoryFlags, memory // 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise Internal(f"Failed updating memory limit: {exc}") from None
        # LXD waits 10 x 0.5 s; under TCG a guest inflates its balloon slower.
        deadline = time.monotonic() + BALLOON_WAIT
        while True:
            cur_mib = (await in_thread(dom.info))[2] // 1024
            if abs(cur_mib - new_mib) <= new_mib // 100:
                return
            if time.monotonic() > deadline:
                raise Internal(
                    f"Failed updating memory limit: Failed setting memory to {new_mib}MiB "
                    f"(currently {cur_mib}MiB) as it was taking too long"
                )
            await asyncio.sleep(BALLOON_POLL)

    def _set_limits(self, name: str, memory: int, vcpus: int) -> None:
        dom = self._lookup(name)
        xml = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        for tag in ("memory", "currentMemory"):
            el = xml.find(tag)
            if el is None:
                el = ET.SubElement(xml, tag)
            el.set("unit", "b")
            el.text = str(memory)
        _vcpu_elements(xml, vcpus)
        try:
            self._connection().defineXML(ET.tostring(xml, encoding="unicode"))
        except libvirt.libvirtError as exc:
            raise InvalidArgument(f"libvirt refused the limits: {exc}") from None

    # -- live disk move

    async def move_root_disk(self, name: str, disk: str, volume: str) -> None:
        """libvirt's block copy (QEMU's blockdev-mirror): the root disk is mirrored into
        `disk` while the guest runs and writes, and once source and copy agree and stay in
        step (the job is ready), the guest is switched to the copy (a pivot, QEMU's
        block-job-complete). The persistent definition is rewritten first and taken back
        if the pivot does not happen; the job is cancelled on any failure, leaving the
        guest on its old disk."""
        async with Reverter() as revert:
            old_xml = await in_thread(self._persistent_xml, name)
            revert.add(lambda: in_thread(self._define, old_xml))
            await in_thread(self._define, self._moved_definition(old_xml, disk, volume))
            await in_thread(self._begin_mirror, name, disk)
            revert.add(lambda: in_thread(self._cancel_mirror, name))
            deadline = time.monotonic() + MIRROR_TIMEOUT
            while not await in_thread(self._try_pivot, name):
                if time.monotonic() > deadline:
                    raise Internal(f'The disk of "{name}" was not mirrored within the timeout')
                await asyncio.sleep(MIRROR_POLL)
            revert.success()

    def _persistent_xml(self, name: str) -> str:
        return str(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    def _define(self, xml: str) -> None:
        try:
            self._connection().defineXML(xml)
        except libvirt.libvirtError as exc:
            raise InvalidArgument(f"libvirt refused the definition: {exc}") from None

    @staticmethod
    def _moved_definition(xml: str, disk: str, volume: str) -> str:
        """The definition `xml` with its root disk at `disk`, and its boot files (a
        direct-boot kernel, initrd) those of the same name in `volume`'s boot directory."""
        root = ET.fromstring(xml)
        for disk_el in root.findall("devices/disk"):
            target = disk_el.find("target")
            if target is None or target.get("dev") != ROOT_TARGET:
                continue
            is_block = Path(disk).is_block_device()
            disk_el.set("type", "block" if is_block else "file")
            source = disk_el.find("source")
            if source is None:
                source = ET.SubElement(disk_el, "source")
            source.attrib.clear()
            source.set("dev" if is_block else "file", disk)
        for tag in ("kernel", "initrd"):
            el = root.find(f"os/{tag}")
            if el is not None and el.text:
                moved = Path(volume) / BOOT_DIR / Path(el.text).name
                if not moved.is_file():
                    raise Internal(f"the new volume has no {BOOT_DIR}/{moved.name}")
                el.text = str(moved)
        return ET.tostring(root, encoding="unicode")

    def _begin_mirror(self, name: str, disk: str) -> None:
        dom = self._lookup(name)
        if not dom.isActive():
            raise Conflict(f'Instance "{name}" is not running')
        kind, attr = ("block", "dev") if Path(disk).is_block_device() else ("file", "file")
        dest = f"<disk type='{kind}'><driver type='raw'/><source {attr}='{disk}'/></disk>"
        # The target is storage's (made empty, the right size): reused, not created; the
        # job is not carried over a restart of the domain (the definition says the rest).
        flags = (
            libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        )
        try:
            dom.blockCopy(ROOT_TARGET, dest, None, flags)
        except libvirt.libvirtError as exc:
            raise Internal(f"Failed to start mirroring the disk: {exc}") from None

    def _try_pivot(self, name: str) -> bool:
        """Switch to the copy if the mirror is ready; False while it is still copying."""
        dom = self._lookup(name)
        try:
            info = dom.blockJobInfo(ROOT_TARGET, 0)
        except libvirt.libvirtError as exc:  # the VM ended meanwhile, say
            raise Internal(f"The disk mirror stopped before it was complete: {exc}") from None
        if not info:
            raise Internal("The disk mirror stopped before it was complete")
        if info.get("end", 0) == 0 or info.get("cur") != info.get("end"):
            return False
        try:
            dom.blockJobAbort(ROOT_TARGET, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                return False  # copied, not yet in step: "not ready for pivot yet"
            raise Internal(f"Failed to switch to the mirrored disk: {exc}") from None
        return True

    def _cancel_mirror(self, name: str) -> None:
        dom = self._lookup(name)
        with contextlib.suppress(libvirt.libvirtError):
            if dom.blockJobInfo(ROOT_TARGET, 0):
                dom.blockJobAbort(ROOT_TARGET, 0)

    # -- the agent

    async def _agent(self, name: str) -> AgentConnection:
        """The VM's agent connection, made (and the agent greeted) if need be. Conflict
        when the VM does not run or its agent does not answer.

        A live connection means a running VM (QEMU closes the port's socket when the VM
        ends; a stop and a freeze drop the connection): libvirt is asked for the VM's
        status only to make one, which keeps a thread hop and a libvirt call out of
        every exec's round trip."""
        conn = connection_for(self._agent_socket(name))
        if conn.connected:
            return conn
        status = await self.status(name)
        if status is Status.FROZEN:
            raise Conflict("Instance is frozen")  # LXD's words: its agent cannot answer
        if status is not Status.RUNNING:
            raise Conflict("Instance is not running")
        await conn.connect()
        return conn

    def _agent_socket(self, name: str) -> str:
        return str(self.instance_dir(name) / "agent.sock")

    def _forget_agent(self, name: str) -> None:
        drop_connection(self._agent_socket(name))

    async def _ask(
        self, name: str, header: dict[str, Any], payload: bytes = b"", path: str = ""
    ) -> dict[str, Any]:
        """One request to the agent and its answer; an `error` answer raised as croft's
        error (NotFound for a missing path)."""
        conn = await self._agent(name)
        answer, _ = await conn.request(header, payload)
        if answer.get("t") == "error":
            raise _agent_error(answer, path)
        return answer

    async def agent_exec(
        self, name: str, command: str, timeout: float = AGENT_TIMEOUT
    ) -> tuple[int, bytes, bytes]:
        """Run a shell command in the guest through its agent: (exit code, stdout,
        stderr). Conflict when the VM does not run or its agent does not answer."""
        process = await self.exec(name, ["/bin/sh", "-c", command])
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        os.close(process.stdin)
        process.stdin = None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                out, err = await asyncio.gather(
                    loop.run_in_executor(None, _read_all, process.stdout),
                    loop.run_in_executor(None, _read_all, process.stderr),
                )
                return await process.wait(), out, err
        except TimeoutError:
            raise Conflict(AGENT_DOWN) from None
        finally:
            process.close()

    async def start_exec(self, name: str, run: ExecCommand) -> ExecProcess:
        argv, env, cwd = run.argv, run.env, run.cwd
        uid, gid, interactive = run.uid, run.gid, run.interactive
        width, height = run.width, run.height
        for key in env:
            if not key or "=" in key or "\0" in key or "\0" in env[key]:
                raise InvalidArgument(f'Invalid environment variable name "{key}"')
        if cwd and not cwd.startswith("/"):
            raise InvalidArgument(f'cwd "{cwd}" must be absolute')
        conn = await self._agent(name)
        rid, queue = conn.open()
        try:
            conn.send(
                {
                    "t": "exec", "id": rid, "argv": argv, "env": env, "cwd": cwd or "",
                    "uid": uid, "gid": gid, "pty": interactive, "w": width, "h": height,
                }
            )  # fmt: skip
            await conn.drain()
            async with asyncio.timeout(AGENT_TIMEOUT):
                answer, _ = await conn.answer(queue)
        except TimeoutError:
            conn.forget(rid)
            raise Conflict(AGENT_DOWN) from None
        except BaseException:
            conn.forget(rid)
            raise
        if answer.get("t") == "error":
            conn.forget(rid)
            raise _agent_error(answer, cwd or "")
        return AgentExecProcess(conn, rid, queue, interactive, int(answer.get("pid", 0)))

    async def shutdown_through_agent(self, name: str) -> None:
        """Ask the guest's agent to power the guest off (a clean shutdown for a guest
        that does not answer the ACPI power button)."""
        await self._ask(name, {"t": "shutdown"})

    # -- files, through the agent

    async def push_file(
        self,
        name: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
    ) -> None:
        conn = await self._agent(name)
        rid, queue = conn.open()
        header = {"t": "put", "id": rid, "path": path, "mode": mode & 0o7777, "uid": uid,
                  "gid": gid}  # fmt: skip

        async def chunks() -> AsyncIterator[bytes]:
            if isinstance(data, bytes):
                for i in range(0, len(data), PUT_CHUNK):
                    yield data[i : i + PUT_CHUNK]
            else:
                buf = b""
                async for piece in data:
                    buf += piece
                    while len(buf) >= PUT_CHUNK:
                        yield buf[:PUT_CHUNK]
                        buf = buf[PUT_CHUNK:]
                yield buf

        try:
            pending = None
            async for chunk in chunks():
                if pending is not None:
                    conn.send({**header, "more": True}, pending)
                    await conn.drain()
                    if not queue.empty():  # refused early (a missing directory)
                        break
                pending = chunk
            if queue.empty():
                conn.send({**header, "more": False}, pending or b"")
                await conn.drain()
            async with asyncio.timeout(FILE_TIMEOUT):
                answer, _ = await conn.answer(queue)
        except TimeoutError:
            raise Conflict(AGENT_DOWN) from None
        finally:
            conn.forget(rid)
        if answer.get("t") == "error":
            raise _agent_error(answer, path)

    async def pull_file(self, name: str, path: str) -> FileEntry:
        conn = await self._agent(name)
        async with conn.frames({"t": "get", "path": path}) as queue:
            async with asyncio.timeout(FILE_TIMEOUT):
                head, _ = await conn.answer(queue)
                if head.get("t") == "error":
                    raise _agent_error(head, path)
                entry = FileEntry(
                    path=path, type=str(head.get("kind", "file")), uid=int(head.get("uid", 0)),
                    gid=int(head.get("gid", 0)), mode=int(head.get("mode", 0)),
                )  # fmt: skip
                if entry.type == "directory":
                    entry.entries = [str(n) for n in head.get("entries", [])]
                elif entry.type == "symlink":
                    entry.target = str(head.get("target", ""))
                else:
                    entry.type = "file"
                    parts = []
                    while True:
                        more, payload = await conn.answer(queue)
                        if more.get("t") == "error":
                            raise _agent_error(more, path)
                        parts.append(payload)
                        if not more.get("more"):
                            break
                    entry.content = b"".join(parts)
        return entry

    async def mkdir(
        self, name: str, path: str, uid: int = 0, gid: int = 0, mode: int = 0o755
    ) -> None:
        request = {"t": "mkdir", "path": path, "uid": uid, "gid": gid, "mode": mode & 0o7777}
        await self._ask(name, request, path=path)

    async def delete_path(self, name: str, path: str, recursive: bool = False) -> None:
        await self._ask(name, {"t": "delete", "path": path, "recursive": recursive}, path=path)

    async def list_dir(self, name: str, path: str) -> builtins.list[str]:
        entry = await self.pull_file(name, path)
        if entry.type != "directory":
            raise InvalidArgument(f'"{path}" is not a directory')
        return entry.entries or []

    # -- console

    async def console_log(self, name: str) -> bytes:
        path = self.instance_dir(name) / "console.log"
        try:
            return await in_thread(path.read_bytes)
        except FileNotFoundError:
            return b""

    async def console(self, name: str, width: int = 80, height: int = 24) -> ExecProcess:
        if await self.status(name) is not Status.RUNNING:
            raise Conflict(f'Instance "{name}" is not running')
        sock = self.instance_dir(name) / "console.sock"
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        tty.setraw(slave)  # the guest's own tty does the line discipline
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-S", "-c", _CONSOLE_RELAY, str(sock),
                stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return ConsoleProcess(process, master)

    async def vga_console(self, name: str) -> ExecProcess:
        if await self.status(name) is not Status.RUNNING:
            raise Conflict(f'Instance "{name}" is not running')
        sock = self.instance_dir(name) / "spice.sock"
        if not sock.exists():  # a VM defined before croft gave VMs a SPICE server
            raise Conflict(f'Instance "{name}" has no VGA console until its next start')
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-S", "-c", _CONSOLE_RELAY, str(sock),
                stdin=in_r, stdout=out_w, stderr=err_w, start_new_session=True,
            )  # fmt: skip
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        return RelayProcess(process, in_w, out_r, err_r)

    async def clear_console_log(self, name: str) -> None:
        path = self.instance_dir(name) / "console.log"
        with contextlib.suppress(FileNotFoundError):
            await in_thread(os.truncate, path, 0)

    def log_path(self, name: str) -> str:
        return f"/var/log/libvirt/qemu/{self.domain_name(name)}.log"
