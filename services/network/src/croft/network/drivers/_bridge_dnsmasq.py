"""One dnsmasq per managed bridge: its command line, its files, its process.

dnsmasq runs as a daemon (it outlives the network service); its pid file plus a
/proc check of its command line lets a restarted service adopt it instead of starting a
second copy. Host entries live in directories dnsmasq watches (`--dhcp-hostsdir`,
`--hostsdir`), one file per host: adding an instance writes its two small files, which
dnsmasq reads through inotify, instead of rewriting files of every host and making
dnsmasq re-read them all (SIGHUP) on every launch. Removing one deletes its files and
sends a SIGHUP (dnsmasq forgets DHCP hosts only then). Nothing restarts dnsmasq.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from croft.common.errors import Internal
from croft.common.proc import run

DNSMASQ = "dnsmasq"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def is_mac(value: str) -> bool:
    return bool(_MAC_RE.match(value.lower()))


@dataclass(frozen=True)
class DhcpHost:
    """One `--dhcp-hostsfile` line: this MAC gets this name (and these addresses, if
    set: LXD's `MAC[,IPv4][,[IPv6]],NAME`)."""

    hwaddr: str
    name: str
    ipv4: str | None = None
    ipv6: str | None = None

    def line(self) -> str:
        return ",".join(
            [
                self.hwaddr,
                *([self.ipv4] if self.ipv4 else []),
                *([f"[{self.ipv6}]"] if self.ipv6 else []),
                self.name,
            ]
        )

    @classmethod
    def parse(cls, line: str) -> DhcpHost | None:
        parts = line.strip().split(",")
        if len(parts) < 2 or len(parts) > 4:
            return None
        hwaddr, middle, name = parts[0], parts[1:-1], parts[-1]
        ipv4 = next((p for p in middle if not p.startswith("[")), None)
        ipv6 = next((p.strip("[]") for p in middle if p.startswith("[")), None)
        return cls(hwaddr, name, ipv4, ipv6)


@dataclass(frozen=True)
class Lease:
    """One line of dnsmasq's lease file."""

    expiry: int
    hwaddr: str  # "" for DHCPv6 leases (dnsmasq stores an IAID there)
    address: str
    hostname: str  # "" when the client sent none
    client_id: str  # "" when none


@dataclass(frozen=True)
class DnsmasqOptions:
    """What a bridge asks of its dnsmasq."""

    interface: str
    listen_addresses: Sequence[str]
    dhcp_ranges: Sequence[str] = ()  # dnsmasq --dhcp-range values
    dhcp_options: Sequence[str] = ()  # dnsmasq --dhcp-option values
    domain: str | None = None  # None: no local DNS domain
    dns: bool = True  # False: DHCP only (port=0)
    ipv6_ra: bool = False
    raw_config: bool = False  # a raw.dnsmasq file exists in the state dir


class Dnsmasq:
    """The dnsmasq of one bridge, with its files in `state_dir`."""

    def __init__(self, state_dir: Path, interface: str) -> None:
        self.state_dir = state_dir
        self.interface = interface
        self.pid_file = state_dir / "dnsmasq.pid"
        self.lease_file = state_dir / "dnsmasq.leases"
        self.hosts_dir = state_dir / "dnsmasq.hosts.d"  # DHCP hosts: MAC, [address,] name
        self.names_dir = state_dir / "dnsmasq.names.d"  # DNS names of fixed addresses
        # Where host entries lived before: read once, then replaced by the directories.
        self.legacy_files = (state_dir / "dnsmasq.hosts", state_dir / "dnsmasq.addn-hosts")
        self.raw_file = state_dir / "dnsmasq.raw"
        self.log_file = state_dir / "dnsmasq.log"

    def argv(self, opts: DnsmasqOptions) -> list[str]:
        argv = [
            DNSMASQ,
            f"--conf-file={self.raw_file if opts.raw_config else '/dev/null'}",
            "--strict-order",
            "--bind-interfaces",
            "--except-interface=lo",
            f"--interface={opts.interface}",
            *(f"--listen-address={a}" for a in opts.listen_addresses),
            f"--pid-file={self.pid_file}",
            f"--log-facility={self.log_file}",
            # As LXD: no log line per DHCP message and router advertisement (the log
            # grew by ~50 KB per container launched, and every line is a write).
            "--quiet-dhcp",
            "--quiet-dhcp6",
            "--quiet-ra",
            "--no-ping",
            "--no-negcache",
            "--no-hosts",
            "--dhcp-rapid-commit",
            "--dhcp-no-override",
            "--dhcp-authoritative",
            f"--dhcp-leasefile={self.lease_file}",
            f"--dhcp-hostsdir={self.hosts_dir}",
            f"--hostsdir={self.names_dir}",
            *(f"--dhcp-range={r}" for r in opts.dhcp_ranges),
            *(f"--dhcp-option={o}" for o in opts.dhcp_options),
        ]
        if opts.ipv6_ra:
            argv.append("--enable-ra")
        if not opts.dns:
            argv.append("--port=0")
        elif opts.domain:
            argv += [
                f"--domain={opts.domain}",
                f"--local=/{opts.domain}/",
                "--domain-needed",
                f"--interface-name=_gateway.{opts.domain},{opts.interface}",
            ]
        return argv

    # -- process -------------------------------------------------------------------

    def running_pid(self) -> int | None:
        """The pid of this bridge's running dnsmasq, or None. Checks /proc so a stale pid
        file (or a pid reused by another program) is not mistaken for it."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        argv = _proc_cmdline(pid)
        if (
            argv
            and os.path.basename(argv[0]) == DNSMASQ
            and f"--interface={self.interface}" in argv
            and f"--pid-file={self.pid_file}" in argv
        ):
            return pid
        return None

    def start(self, argv: list[str]) -> int:
        """Ensure dnsmasq runs with exactly `argv`: adopt a running one started with the
        same command line (and make it re-read its host files), else replace it."""
        pid = self.running_pid()
        if pid is not None:
            if _proc_cmdline(pid)[1:] == argv[1:]:
                self.reload()
                return pid
            self.stop()
        self.hosts_dir.mkdir(exist_ok=True)
        self.names_dir.mkdir(exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        # dnsmasq's parent exits once the daemon is ready (or reports why it is not), so
        # run() returns with the pid file written.
        run(argv, timeout=30)
        pid = self.running_pid()
        if pid is None:
            raise Internal(f"dnsmasq for {self.interface} did not start (see {self.log_file})")
        return pid

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        pid = self.running_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def reload(self) -> None:
        """Make dnsmasq re-read the host files (SIGHUP); nothing if it is not running."""
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    # -- files ---------------------------------------------------------------------

    def read_hosts(self) -> list[DhcpHost]:
        hosts: dict[str, DhcpHost] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.legacy_files[0].read_text().splitlines():
                if (host := DhcpHost.parse(line)) is not None:
                    hosts[host.hwaddr] = host
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.hosts_dir):
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    host = DhcpHost.parse(Path(entry.path).read_text())
                    if host is not None:
                        hosts[host.hwaddr] = host
        return sorted(hosts.values(), key=lambda h: h.hwaddr)

    def write_hosts(self, hosts: Iterable[DhcpHost], domain: str | None) -> None:
        """Make the host entries exactly `hosts` (and drop the old single files)."""
        hosts = list(hosts)
        for directory in (self.hosts_dir, self.names_dir):
            directory.mkdir(exist_ok=True)
        wanted = {_file_name(h.hwaddr) for h in hosts}
        for directory in (self.hosts_dir, self.names_dir):
            for entry in os.scandir(directory):
                if entry.name not in wanted:
                    Path(entry.path).unlink(missing_ok=True)
        for host in hosts:
            self.add_host(host, domain)
        for legacy in self.legacy_files:
            legacy.unlink(missing_ok=True)

    def host(self, hwaddr: str) -> DhcpHost | None:
        """The entry of one MAC address, if there is one."""
        try:
            return DhcpHost.parse((self.hosts_dir / _file_name(hwaddr)).read_text())
        except FileNotFoundError:
            return None

    def add_host(self, host: DhcpHost, domain: str | None) -> None:
        """Add (or replace) one host's entries; a running dnsmasq reads them by itself."""
        name = _file_name(host.hwaddr)
        _write_atomic(self.hosts_dir / name, host.line() + "\n")
        if host.ipv4 or host.ipv6:
            fqdn = f"{host.name}.{domain} " if domain else ""
            lines = "".join(
                f"{address} {fqdn}{host.name}\n" for address in (host.ipv4, host.ipv6) if address
            )
            _write_atomic(self.names_dir / name, lines)
        else:
            (self.names_dir / name).unlink(missing_ok=True)

    def remove_host(self, hwaddr: str) -> bool:
        """Remove one host's entries; whether there were any. The caller reloads."""
        name = _file_name(hwaddr)
        found = (self.hosts_dir / name).exists()
        (self.hosts_dir / name).unlink(missing_ok=True)
        (self.names_dir / name).unlink(missing_ok=True)
        return found

    def read_leases(self) -> list[Lease]:
        try:
            text = self.lease_file.read_text()
        except FileNotFoundError:
            return []
        leases = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[0] == "duid":
                continue
            hwaddr = fields[1] if is_mac(fields[1]) else ""
            leases.append(
                Lease(
                    expiry=int(fields[0]),
                    hwaddr=hwaddr,
                    address=fields[2],
                    hostname="" if fields[3] == "*" else fields[3],
                    client_id="" if len(fields) < 5 or fields[4] == "*" else fields[4],
                )
            )
        return leases

    def release(self, lease: Lease) -> None:
        """Make the running dnsmasq drop an IPv4 lease now (dhcp_release sends it a
        DHCPRELEASE on the bridge as if from the client)."""
        argv = ["dhcp_release", self.interface, lease.address, lease.hwaddr]
        if lease.client_id:
            argv.append(lease.client_id)
        run(argv, timeout=10)


def _file_name(hwaddr: str) -> str:
    return hwaddr.lower().replace(":", "-")


def _write_atomic(path: Path, text: str) -> None:
    # A dot name: dnsmasq's inotify skips it, and reads the file once renamed into place.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)  # dnsmasq re-reads these after dropping root
    os.replace(tmp, path)


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (dnsmasq is reparented to
    PID 1, which may reap it late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
