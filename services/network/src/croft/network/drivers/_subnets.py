"""Choosing and checking subnets against what the host already routes."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import TypeVar

from pyroute2 import IPRoute

from croft.common.errors import InvalidArgument, Unavailable

# LXD tries this many random candidates before giving up.
_AUTO_ATTEMPTS = 100


def _invalid(key: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"Invalid value for network config key {key!r}: {why}")


_Interface = TypeVar("_Interface", IPv4Interface, IPv6Interface)


def _interface(kind: type[_Interface], key: str, value: str, example: str) -> _Interface:
    """`value` as an address with its subnet, which it must name with a prefix length."""
    family = "IPv4" if kind is IPv4Interface else "IPv6"
    try:
        iface = kind(value)
    except ValueError as exc:
        raise _invalid(
            key, f"{value!r} is not an {family} address with a prefix length (like {example})"
        ) from exc
    if "/" not in value:
        raise _invalid(key, f"{value!r} needs a prefix length (like {example})")
    return iface


def parse_ipv4_interface(key: str, value: str) -> IPv4Interface:
    """`10.0.3.1/24` -> the gateway address with its subnet; InvalidArgument naming `key`."""
    iface = _interface(IPv4Interface, key, value, "10.0.3.1/24")
    net = iface.network
    if net.prefixlen > 30:
        raise _invalid(
            key, f"a /{net.prefixlen} subnet has no room for instances (use /30 or larger)"
        )
    if iface.ip in (net.network_address, net.broadcast_address):
        raise _invalid(
            key,
            f"{iface.ip} is the "
            f"{'network' if iface.ip == net.network_address else 'broadcast'} address "
            f"of {net}, not a usable gateway address",
        )
    return iface


def parse_ipv6_interface(key: str, value: str) -> IPv6Interface:
    iface = _interface(IPv6Interface, key, value, "fd42:1:2:3::1/64")
    if iface.ip == iface.network.network_address:
        raise _invalid(
            key, f"{value!r} must be a host address with a prefix length (like fd42:1:2:3::1/64)"
        )
    return iface


def host_networks() -> tuple[list[IPv4Network], list[IPv6Network]]:
    """Every subnet the host has a route or an address in (all routing tables), except
    default routes."""
    v4: list[IPv4Network] = []
    v6: list[IPv6Network] = []

    def add(net: IPv4Network | IPv6Network) -> None:
        if isinstance(net, IPv4Network):
            v4.append(net)
        else:
            v6.append(net)

    with IPRoute() as ipr:
        for family in (2, 10):  # AF_INET, AF_INET6
            for route in ipr.get_routes(family=family):
                dst = route.get("RTA_DST")
                length = route["dst_len"]
                if dst is None or length == 0:
                    continue
                add(ipaddress.ip_network(f"{dst}/{length}", strict=False))
            for addr in ipr.get_addr(family=family):
                ip = addr.get("IFA_ADDRESS")
                if ip is None:
                    continue
                add(ipaddress.ip_network(f"{ip}/{addr['prefixlen']}", strict=False))
    return v4, v6


def overlapping(
    subnet: IPv4Network | IPv6Network, used: Iterable[IPv4Network | IPv6Network]
) -> IPv4Network | IPv6Network | None:
    """The first of `used` that overlaps `subnet`, or None."""
    for other in used:
        if other.version == subnet.version and subnet.overlaps(other):
            return other
    return None


def pick_ipv4_subnet(used: Iterable[IPv4Network], rng: random.Random | None = None) -> IPv4Network:
    """A random free 10.x.y.0/24 (LXD's `auto`) overlapping none of `used`."""
    taken = list(used)
    r = rng or random.SystemRandom()
    for _ in range(_AUTO_ATTEMPTS):
        candidate = IPv4Network(f"10.{r.randrange(256)}.{r.randrange(256)}.0/24")
        if overlapping(candidate, taken) is None:
            return candidate
    raise Unavailable("No free IPv4 subnet found for ipv4.address=auto; set one explicitly")


def pick_ipv6_subnet(used: Iterable[IPv6Network], rng: random.Random | None = None) -> IPv6Network:
    """A random free fd42:xxxx:xxxx:xxxx::/64 (LXD's `auto`, a ULA prefix)."""
    taken = list(used)
    r = rng or random.SystemRandom()
    for _ in range(_AUTO_ATTEMPTS):
        groups = ":".join(f"{r.randrange(65536):x}" for _ in range(3))
        candidate = IPv6Network(f"fd42:{groups}::/64")
        if overlapping(candidate, taken) is None:
            return candidate
    raise Unavailable("No free IPv6 subnet found for ipv6.address=auto; set one explicitly")
