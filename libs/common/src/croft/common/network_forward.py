"""Network forwards as LXD 5.0 has them, independent of any network driver.

A forward is a listen address on a network with a default target (every port) and port
specifications (protocol, listen ports, target address and ports). `parse_forward`
checks one as LXD's `forwardValidate` does (LXD's words); `Forward.port_maps()` gives the
(protocol, listen port range, target address, target port range) a driver DNATs.

Records: `record_key("network-forwards", "default", "<network>/<listen address>")`, LXD's
`NetworkForward` shape (`listen_address`, `description`, `config`, `ports`, `location`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from croft.common.errors import InvalidArgument
from croft.common.instance_config import go_quote
from croft.common.records import RECORDS

PROTOCOLS = ("tcp", "udp")
PORT_FIELDS = ("description", "protocol", "listen_port", "target_port", "target_address")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def forward_prefix(network: str) -> str:
    """Where a network's forwards are recorded."""
    return f"{RECORDS}network-forwards/default/{network}/"


def forward_key(network: str, listen_address: str) -> str:
    return forward_prefix(network) + listen_address


@dataclass(frozen=True)
class ForwardPort:
    description: str = ""
    protocol: str = ""
    listen_port: str = ""
    target_port: str = ""
    target_address: str = ""

    def to_api(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in PORT_FIELDS}


@dataclass(frozen=True)
class PortMap:
    """What a driver forwards: `protocol` traffic to the listen address on
    `listen_ports` (first, last) goes to `target` on `target_ports` (first, last; the
    same count as the listen ports, or one port for all of them)."""

    protocol: str
    listen_ports: tuple[int, int]
    target: IPAddress
    target_ports: tuple[int, int]


@dataclass(frozen=True)
class Forward:
    """A validated forward."""

    listen_address: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    ports: tuple[ForwardPort, ...] = ()
    location: str = ""

    @property
    def listen(self) -> IPAddress:
        return ipaddress.ip_address(self.listen_address)

    @property
    def default_target(self) -> IPAddress | None:
        target = self.config.get("target_address", "")
        return ipaddress.ip_address(target) if target else None

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Forward:
        """A forward from its stored record (validated when it was written)."""
        return cls(
            listen_address=str(data["listen_address"]),
            description=str(data.get("description") or ""),
            config=dict(data.get("config") or {}),
            ports=tuple(ForwardPort(**p) for p in data.get("ports") or []),
            location=str(data.get("location") or ""),
        )

    def to_api(self) -> dict[str, Any]:
        return {
            "listen_address": self.listen_address,
            "description": self.description,
            "config": dict(self.config),
            "ports": [p.to_api() for p in self.ports],
            "location": self.location,
        }

    def port_maps(self) -> list[PortMap]:
        maps: list[PortMap] = []
        for port in self.ports:
            listen = [_range(r) for r in port.listen_port.split(",")]
            target = [_range(r) for r in port.target_port.split(",")] if port.target_port else []
            address = ipaddress.ip_address(port.target_address)
            if not target:
                maps.extend(PortMap(port.protocol, r, address, r) for r in listen)
            elif sum(b - a + 1 for a, b in target) == 1:
                one = target[0]
                maps.extend(PortMap(port.protocol, r, address, one) for r in listen)
            else:
                # Same count: walk both lists port by port, one map per listen port.
                flat = [p for a, b in target for p in range(a, b + 1)]
                ports = [p for a, b in listen for p in range(a, b + 1)]
                maps.extend(
                    PortMap(port.protocol, (lp, lp), address, (tp, tp))
                    for lp, tp in zip(ports, flat, strict=True)
                )
        return maps


def _range(text: str) -> tuple[int, int]:
    """LXD's `ParsePortRange`: N or N-M (M above N), ports 0-65535."""
    parts = text.strip().split("-")
    if len(parts) > 2:
        raise ValueError(f"Invalid port range {go_quote(text)}")
    numbers = []
    for part in parts:
        if not part.isdigit() or int(part) > 65535:
            raise ValueError(f"strconv.ParseInt: parsing {go_quote(part)}: invalid syntax")
        numbers.append(int(part))
    if len(numbers) == 2 and numbers[1] <= numbers[0]:
        raise ValueError("End port should be higher than start port")
    return numbers[0], numbers[-1]


def parse_forward(
    body: Mapping[str, Any], subnets: Mapping[int, ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> Forward:
    """A forward from LXD's JSON (`NetworkForwardsPost`), checked as LXD's
    `forwardValidate`: `subnets` is the network's subnet per IP version, which
    targets must be inside."""
    listen_text = body.get("listen_address") or ""
    if not isinstance(listen_text, str):
        raise InvalidArgument("Invalid listen address")
    try:
        listen = ipaddress.ip_address(listen_text)
    except ValueError:
        raise InvalidArgument(
            f"Failed parsing address forward listen address {go_quote(listen_text)}: "
            "Invalid IP address"
        ) from None
    if listen.is_unspecified:
        raise InvalidArgument("Cannot use unspecified address")
    description = body.get("description") or ""
    config = body.get("config") or {}
    ports_raw = body.get("ports") or []
    if not isinstance(config, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()
    ):
        raise InvalidArgument("Invalid forward: config must map strings to strings")
    if not isinstance(ports_raw, list) or not isinstance(description, str):
        raise InvalidArgument("Invalid forward: ports must be a list")
    for key in config:
        if key != "target_address" and not key.startswith("user."):
            raise InvalidArgument(f"Invalid option {go_quote(key)}")
    subnet = subnets.get(listen.version)
    default = None
    if config.get("target_address"):
        try:
            default = ipaddress.ip_address(config["target_address"])
        except ValueError:
            raise InvalidArgument("Invalid default target address") from None
        if default.version != listen.version:
            raise InvalidArgument(
                "Cannot mix IP versions in listen address and default target address"
            )
        if subnet is not None and default not in subnet:
            raise InvalidArgument("Default target address is not within the network subnet")
    ports = []
    seen: set[tuple[str, int]] = set()
    for index, raw in enumerate(ports_raw):
        if not isinstance(raw, Mapping) or not all(
            k in PORT_FIELDS and isinstance(v, str) for k, v in raw.items()
        ):
            raise InvalidArgument(f"Invalid port specification {index}")
        port = ForwardPort(**{k: v.strip() for k, v in raw.items()})
        if port.protocol not in PROTOCOLS:
            raise InvalidArgument(
                f"Invalid port protocol in port specification {index}, protocol must be "
                f"one of: {', '.join(PROTOCOLS)}"
            )
        try:
            target = ipaddress.ip_address(port.target_address)
        except ValueError:
            raise InvalidArgument(f"Invalid target address in port specification {index}") from None
        if target == default:
            raise InvalidArgument(
                f"Target address is same as default target address in port specification {index}"
            )
        if target.version != listen.version:
            raise InvalidArgument(
                "Cannot mix IP versions in listen address and port specification "
                f"{index} target address"
            )
        if subnet is not None and target not in subnet:
            raise InvalidArgument(
                f"Target address is not within the network subnet in port specification {index}"
            )
        if not port.listen_port:
            raise InvalidArgument(f"Missing listen port in port specification {index}")
        count = 0
        for text in port.listen_port.split(","):
            try:
                first, last = _range(text)
            except ValueError as exc:
                raise InvalidArgument(
                    f"Invalid listen port in port specification {index}: {exc}"
                ) from None
            for number in range(first, last + 1):
                if (port.protocol, number) in seen:
                    raise InvalidArgument(
                        f"Duplicate listen port {number} for protocol "
                        f"{go_quote(port.protocol)} in port specification {index}"
                    )
                seen.add((port.protocol, number))
                count += 1
        if port.target_port:
            targets = 0
            for text in port.target_port.split(","):
                try:
                    first, last = _range(text)
                except ValueError:
                    raise InvalidArgument(
                        f"Invalid target port in port specification {index}"
                    ) from None
                targets += last - first + 1
            if targets != 1 and targets != count:
                raise InvalidArgument(
                    "Mismatch of listen port(s) and target port(s) count in port "
                    f"specification {index}"
                )
        ports.append(port)
    return Forward(
        listen_address=str(listen),
        description=description,
        config=dict(config),
        ports=tuple(ports),
    )
