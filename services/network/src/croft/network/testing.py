"""Stand-in instances for tests of managed networks: a network namespace whose `eth0` is
one end of a veth pair plugged into a bridge, with busybox udhcpc and nslookup as its
DHCP and DNS clients. Real kernel, real dnsmasq; only the container is left out.

    guests = Guests(tmp_dir, prefix="crtn")
    guest = guests.make("croftbr0", hwaddr)
    address = guest.dhcp()
    guests.remove_all()
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from croft.network.drivers import generate_hwaddr

UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc hook: configure what the DHCP server handed out.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi
    ;;
esac
exit 0
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command for a test (60 s timeout, output captured as text)."""
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Guest:
    """A network namespace with `eth0` plugged into a bridge: a stand-in instance."""

    netns: str
    host_veth: str
    hwaddr: str
    script: Path

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *argv, check=check)

    def dhcp(self, requested: str | None = None) -> str | None:
        """Run one busybox udhcpc exchange; return the IPv4 address it configured."""
        argv = ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "10", "-T", "1"]
        argv += ["-s", str(self.script)]
        if requested:
            argv += ["-r", requested]
        self.run(*argv, check=False)
        return self.ipv4()

    def ipv4(self) -> str | None:
        out = self.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.split()
        return out[out.index("inet") + 1].split("/")[0] if "inet" in out else None

    def nslookup(self, name: str, server: str) -> str | None:
        """The IPv4 address `server` answers for `name` (busybox nslookup), or None."""
        result = self.run("busybox", "nslookup", name, server, check=False)
        if result.returncode != 0:
            return None
        seen_name = False
        for line in result.stdout.splitlines():
            if line.startswith("Name:") and line.split()[-1] == name:
                seen_name = True
            elif seen_name and line.startswith("Address"):
                return line.split()[-1]
        return None

    def remove(self) -> None:
        sh("ip", "netns", "del", self.netns, check=False)
        sh("ip", "link", "del", self.host_veth, check=False)


@dataclass
class Guests:
    """Makes guests named `<prefix>-<hex>` (netns) / `<prefix>v<hex>` (host veth) and
    removes them all at the end."""

    script_dir: Path
    prefix: str
    made: list[Guest] = field(default_factory=list)

    def make(self, bridge: str | None, hwaddr: str | None = None) -> Guest:
        """A guest plugged into `bridge` (None: left unplugged, for the caller to wire)."""
        script = self.script_dir / "udhcpc.sh"
        if not script.exists():
            script.write_text(UDHCPC_SCRIPT)
            os.chmod(script, 0o755)
        tag = secrets.token_hex(3)
        guest = Guest(
            f"{self.prefix}-{tag}", f"{self.prefix}v{tag}", hwaddr or generate_hwaddr(), script
        )
        self.made.append(guest)
        sh("ip", "netns", "add", guest.netns)
        sh("ip", "link", "add", guest.host_veth, "type", "veth", "peer", "name", "eth0",
           "netns", guest.netns)  # fmt: skip
        guest.run("ip", "link", "set", "eth0", "address", guest.hwaddr)
        guest.run("ip", "link", "set", "eth0", "up")
        guest.run("ip", "link", "set", "lo", "up")
        if bridge is not None:
            sh("ip", "link", "set", guest.host_veth, "master", bridge)
        sh("ip", "link", "set", guest.host_veth, "up")
        return guest

    def remove_all(self) -> None:
        for guest in self.made:
            guest.remove()
        self.made.clear()


def dnsmasq_pids(interface: str) -> list[int]:
    """Every live dnsmasq serving `interface`, found by scanning /proc."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"dnsmasq") and f"--interface={interface}".encode() in argv:
            pids.append(int(proc.name))
    return pids


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


# The userspace datapath's own host interface ("ovs-netdev") is one per host, whatever
# the croft: tests that run OVN (in any worktree) take turns.
OVN_HOST_LOCK = "/run/lock/croft-ovn-tests.lock"


@contextlib.contextmanager
def ovn_host_lock() -> Iterator[None]:
    """Hold the host's OVN test lock (blocking until another test run releases it)."""
    with open(OVN_HOST_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
