"""Network config keys checked as LXD 5.0's drivers check them (`common.validate` and
`shared/validate`): one rule per key, LXD's words in every message (`Invalid value for
network "n" option "k": ...`, `Invalid option for network "n" option "k"`), `user.*`
free. The bridge's rules are here (`RULES`); macvlan and physical declare theirs with
the same validators.

LXD keys that croft's bridge does not implement (fan mode, tunnels, BGP, MAAS,
zones, OVN ranges) are refused with a message that says so, rather than accepted and
silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping

from croft.common.errors import InvalidArgument
from croft.common.instance_config import go_quote, one_of, parse_bool, parse_mac
from croft.common.network_acl import NETWORK_RULES as ACL_NETWORK_RULES

Rule = Callable[[str], object]

_INTERFACE_CHARS = re.compile(r"^[-_a-zA-Z0-9.]+$")
_URL_UNSAFE = ("/", "?", "&", "+")


def check_interface_name(value: str) -> None:
    """LXD's `validate.IsInterfaceName` plus the common network name rule."""
    if len(value) < 2:
        raise InvalidArgument("Network interface is too short (minimum 2 characters)")
    if len(value) > 15:
        raise InvalidArgument("Network interface is too long (maximum 15 characters)")
    if not _INTERFACE_CHARS.fullmatch(value):
        raise InvalidArgument("Network interface contains invalid characters")
    for char in _URL_UNSAFE:
        if char in value:
            raise InvalidArgument(f"Cannot contain {go_quote(char)}")


def _optional(rule: Rule) -> Rule:
    def check(value: str) -> object:
        return None if value == "" else rule(value)

    return check


def _any(value: str) -> object:
    return None


def _go_cidr(value: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Go's net.ParseCIDR: an address, a slash, a prefix length in range."""
    address, sep, length = value.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if not sep or ip is None or not length.isdigit() or int(length) > ip.max_prefixlen:
        raise ValueError(f"invalid CIDR address: {value}")
    return ip, int(length)


def _network_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int) -> str:
    return str(ipaddress.ip_network(f"{ip}/{length}", strict=False).network_address)


def _address_cidr(version: int) -> Rule:
    """`IsNetworkAddressCIDRV4/V6`, with `auto` and `none` allowed (LXD's bridge rule)."""
    family = "IPv4" if version == 4 else "IPv6"

    def check(value: str) -> object:
        if value in ("none", "auto"):
            return None
        ip, length = _go_cidr(value)
        if ip.version != version:
            raise ValueError(f"Not an {family} address {go_quote(value)}")
        if str(ip) == _network_of(ip, length):
            raise ValueError(f"Not a usable {family} address {go_quote(value)}")
        return None

    return check


def _network(version: int) -> Rule:
    """`IsNetworkV4/V6`: a subnet written with its network address."""
    family = "IPv4" if version == 4 else "IPv6"

    def check(value: str) -> object:
        ip, length = _go_cidr(value)
        if ip.version != version:
            raise ValueError(f"Not an {family} network {go_quote(value)}")
        if str(ip) != _network_of(ip, length):
            raise ValueError(f"Not an {family} network address {go_quote(value)}")
        return None

    return check


def _address(version: int) -> Rule:
    family = "IPv4" if version == 4 else "IPv6"

    def check(value: str) -> object:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            ip = None
        if ip is None or ip.version != version:
            raise ValueError(f"Not an {family} address {go_quote(value)}")
        return None

    return check


def _range(version: int) -> Rule:
    """`IsNetworkRangeV4/V6`: START-END."""
    single = _address(version)

    def check(value: str) -> object:
        parts = value.split("-", 1)
        if len(parts) != 2:
            raise ValueError("IP range must contain start and end IP addresses")
        for part in parts:
            single(part)
        return None

    return check


def _list_of(rule: Rule) -> Rule:
    """`IsListOf`: comma-separated items, each named in the error."""

    def check(value: str) -> object:
        for item in value.split(","):
            item = item.strip()
            try:
                rule(item)
            except ValueError as exc:
                raise ValueError(f"Item {go_quote(item)}: {exc}") from None
        return None

    return check


def _mtu(value: str) -> object:
    if not value.isdigit() or int(value) >= 2**32:
        raise ValueError(f"Invalid MTU {go_quote(value)}")
    if not 1280 <= int(value) <= 16384:
        raise ValueError(f"Out of MTU range (1280-16384) {go_quote(value)}")
    return None


def _native_only(value: str) -> object:
    one_of("native", "openvswitch")(value)
    if value != "native":
        raise ValueError("croft's bridges are native Linux bridges (Open vSwitch is not supported)")
    return None


def _standard_only(value: str) -> object:
    one_of("standard", "fan")(value)
    if value != "standard":
        raise ValueError("croft's bridges do not support the FAN mode")
    return None


RULES: dict[str, Rule] = {
    "bridge.driver": _optional(_native_only),
    "bridge.hwaddr": _optional(parse_mac),
    "bridge.mtu": _optional(_mtu),
    "bridge.mode": _optional(_standard_only),
    "ipv4.address": _optional(_address_cidr(4)),
    "ipv4.firewall": _optional(parse_bool),
    "ipv4.nat": _optional(parse_bool),
    "ipv4.nat.address": _optional(_address(4)),
    "ipv4.dhcp": _optional(parse_bool),
    "ipv4.dhcp.gateway": _optional(_address(4)),
    "ipv4.dhcp.expiry": _any,
    "ipv4.dhcp.ranges": _optional(_list_of(_range(4))),
    "ipv4.ovn.ranges": _optional(_list_of(_range(4))),
    "ipv4.routes": _optional(_list_of(_network(4))),
    "ipv4.routing": _optional(parse_bool),
    "ipv6.address": _optional(_address_cidr(6)),
    "ipv6.firewall": _optional(parse_bool),
    "ipv6.nat": _optional(parse_bool),
    "ipv6.nat.address": _optional(_address(6)),
    "ipv6.dhcp": _optional(parse_bool),
    "ipv6.dhcp.expiry": _any,
    "ipv6.dhcp.stateful": _optional(parse_bool),
    "ipv6.dhcp.ranges": _optional(_list_of(_range(6))),
    "ipv6.ovn.ranges": _optional(_list_of(_range(6))),
    "ipv6.routes": _optional(_list_of(_network(6))),
    "ipv6.routing": _optional(parse_bool),
    "dns.domain": _any,
    "dns.mode": _optional(one_of("dynamic", "managed", "none")),
    "dns.search": _any,
    "raw.dnsmasq": _any,
    # ACL keys: which ACLs exist is the core's check (it reads the store).
    **{key: _optional(rule) for key, rule in ACL_NETWORK_RULES.items()},
}

# LXD's bridge keys that croft does not implement: refused by name.
_UNSUPPORTED = re.compile(
    r"^(bridge\.external_interfaces|fan\..*|tunnel\..*|maas\..*|dns\.zone\..*|bgp\..*|"
    r"ipv[46]\.nat\.order)$"
)


def check_bridge_config(name: str, config: Mapping[str, str]) -> None:
    """InvalidArgument, with LXD's message, for the first bad key of a bridge's config
    (in a stable order: LXD's own order is a Go map's)."""
    check_config(name, config, RULES, _UNSUPPORTED)


def required_interface(value: str) -> object:
    """LXD's `validate.Required(validate.IsNotEmpty, validate.IsInterfaceName)`."""
    if value == "":
        raise ValueError("Required value")
    try:
        check_interface_name(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
    return None


def mtu(value: str) -> object:
    """LXD's `validate.IsNetworkMTU`."""
    return _mtu(value)


def check_config(
    name: str,
    config: Mapping[str, str],
    rules: Mapping[str, Rule],
    unsupported: re.Pattern[str] | None = None,
) -> None:
    """LXD's `common.validate`: every rule runs (a required key that is missing fails),
    then any key without a rule is refused; `user.*` is free. Keys `unsupported`
    matches are LXD's but not croft's, and say so."""
    for key in sorted(rules):
        try:
            rules[key](config.get(key, ""))
        except ValueError as exc:
            raise InvalidArgument(
                f"Invalid value for network {go_quote(name)} option {go_quote(key)}: {exc}"
            ) from None
    for key in sorted(config):
        if key in rules or key.startswith("user."):
            continue
        suffix = ""
        if unsupported is not None and unsupported.match(key):
            suffix = ": not supported by croft"
        raise InvalidArgument(
            f"Invalid option for network {go_quote(name)} option {go_quote(key)}{suffix}"
        )
