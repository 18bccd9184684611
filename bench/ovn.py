#!/usr/bin/env python3
"""Issue 18's OVN figure with the stock `lxc` client: launch busybox on an OVN network
until it has an IPv4 address (from OVN's DHCP), beside the same on a plain bridge.

    python3 bench/ovn.py --socket /var/lib/croft/unix.socket [--runs 10]

It makes an uplink bridge (a free /24 with `ipv4.ovn.ranges`), an OVN network on it and
a plain bridge, then launches `--runs` containers one at a time on each: the figure is
the wall time from the `lxc launch` command's start until `lxc list` shows an IPv4
address on eth0. Also: the time of `lxc network create --type=ovn` (the first one starts
OVN's daemons when none run yet), and of `lxc delete --force`. Everything it made is
deleted at the end. LXD 5.0.2 on this host has no OVN to compare with (it has no
`network.ovn.northbound_connection` and this kernel has no openvswitch module).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import subprocess
import sys
import time

import lxd
from lxd import BenchError, Daemon, describe, p50, p95, say


def used_subnets() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    nets = []
    for route in json.loads(out):
        dst = route.get("dst", "")
        if dst and dst != "default" and "/" in dst:
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def free_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    for _ in range(200):
        candidate = ipaddress.IPv4Network(
            f"10.{random.randrange(256)}.{random.randrange(256)}.0/24"
        )
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise BenchError("no free /24 for the bench networks")


def address_of(daemon: Daemon, name: str) -> str:
    for instance in json.loads(daemon.lxc("list", name, "--format", "json")):
        if instance["name"] != name:
            continue
        network = (instance.get("state") or {}).get("network") or {}
        for address in network.get("eth0", {}).get("addresses", []):
            if address["family"] == "inet":
                return str(address["address"])
    return ""


def launch_until_address(daemon: Daemon, name: str, network: str, timeout: float) -> float:
    started = time.perf_counter()
    daemon.lxc("launch", lxd.IMAGE_ALIAS, name, "-n", network)
    while time.perf_counter() - started < timeout:
        if address_of(daemon, name):
            return time.perf_counter() - started
        time.sleep(0.05)
    raise BenchError(f"{name} had no IPv4 address on {network} after {timeout:g}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/var/lib/croft/unix.socket")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--image", default=None, help="busybox tarball, if the alias is missing")
    args = parser.parse_args()

    daemon = Daemon("croft", args.socket)
    lxd.ensure_images([daemon], args.image)
    tag = f"{random.randrange(16**4):04x}"
    uplink, ovn, bridge = f"bnu{tag}", f"bno{tag}", f"bnb{tag}"
    taken = used_subnets()
    up = free_subnet(taken)
    plain = free_subnet([*taken, up])
    base = up.network_address
    made_networks: list[str] = []
    names: list[str] = []
    try:
        daemon.lxc("network", "create", uplink, f"ipv4.address={base + 1}/24", "ipv4.nat=true",
                   "ipv6.address=none", f"ipv4.dhcp.ranges={base + 100}-{base + 200}",
                   f"ipv4.ovn.ranges={base + 10}-{base + 29}")  # fmt: skip
        made_networks.append(uplink)
        create = daemon.timed_lxc("network", "create", ovn, "--type=ovn", f"network={uplink}",
                                  "ipv6.address=none")  # fmt: skip
        made_networks.insert(0, ovn)
        say(f"  network create --type=ovn  {create * 1e3:.0f} ms")
        daemon.lxc("network", "create", bridge, f"ipv4.address={plain.network_address + 1}/24",
                   "ipv6.address=none")  # fmt: skip
        made_networks.insert(0, bridge)

        results = {}
        for label, network in (("ovn", ovn), ("bridge", bridge)):
            warm = f"{lxd.PREFIX}ow{label[0]}{tag}"
            names.append(warm)
            launch_until_address(daemon, warm, network, args.timeout)  # image cached
            samples = []
            for i in range(args.runs):
                name = f"{lxd.PREFIX}o{label[0]}{i:02d}{tag}"
                names.append(name)
                samples.append(launch_until_address(daemon, name, network, args.timeout))
            results[label] = samples
            say(f"  launch until address ({label:6s}) {describe(samples)} ms")
        deletes = [daemon.timed_lxc("delete", "--force", name) for name in names]
        names.clear()
        say(f"  delete --force               {describe(deletes)} ms")
        print()
        print("| figure | croft (p50) | croft (p95) |")
        print("| --- | --- | --- |")
        print(f"| `lxc network create --type=ovn` | {create * 1e3:.0f} ms | |")
        for label, samples in results.items():
            print(f"| launch busybox until IPv4, {label} | {p50(samples) * 1e3:.0f} ms "
                  f"| {p95(samples) * 1e3:.0f} ms |")  # fmt: skip
        print(f"| delete --force | {p50(deletes) * 1e3:.0f} ms | {p95(deletes) * 1e3:.0f} ms |")
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        for name in names:
            daemon.lxc("delete", "--force", name, check=False)
        for network in made_networks:
            daemon.lxc("network", "delete", network, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
