"""nftables rules for managed bridges: one shared table (`inet croft`), chains per network.

Every change is one `nft -f` transaction, so a network's rules are replaced atomically
and a failed load leaves the previous rules in place. Chains are named like LXD's
(`pstrt.<bridge>`, `fwd.<bridge>`, `in.<bridge>`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from croft.common.proc import run

# Serialises read-modify-write of the shared table (e.g. "delete the table if that was
# its last chain") between networks handled by this process.
_table_lock = threading.Lock()

_CHAINS = {
    "pstrt": "type nat hook postrouting priority srcnat; policy accept;",
    "fwd": "type filter hook forward priority filter; policy accept;",
    "in": "type filter hook input priority filter; policy accept;",
}


def _nat_rule(
    family: str,
    subnet: IPv4Network | IPv6Network,
    nat_address: IPv4Address | IPv6Address | None,
    bridge: str,
) -> str:
    """The rule that NATs what `subnet` sends out of the bridge (`family`: ip or ip6): to
    `nat_address`, else masquerading as the outgoing interface's address."""
    action = f"snat {family} to {nat_address}" if nat_address else "masquerade"
    return (
        f"{family} saddr {subnet} {family} daddr != {subnet} oifname != {bridge} counter {action}"
    )


@dataclass(frozen=True)
class BridgeRules:
    """What a bridge needs from the firewall."""

    bridge: str
    ipv4_subnet: IPv4Network | None = None
    ipv4_nat: bool = False
    ipv4_nat_address: IPv4Address | None = None
    ipv6_subnet: IPv6Network | None = None
    ipv6_nat: bool = False
    ipv6_nat_address: IPv6Address | None = None
    # Accept DHCP/DNS to the host and forwarding through the bridge, even where another
    # table's policy would drop it (LXD's ipv4.firewall / ipv6.firewall).
    firewall: bool = True
    # Chains for the network's ACLs and forwards (`_bridge_security`), merged in.
    extra: Mapping[str, list[str]] = field(default_factory=dict)
    # The bridge-family table's chains (NIC filters).
    bridge_extra: Mapping[str, list[str]] = field(default_factory=dict)

    def bridge_chains(self) -> dict[str, list[str]]:
        """Chain kind -> rules for the bridge-family table."""
        return {kind: list(rules) for kind, rules in self.bridge_extra.items() if rules}

    def chains(self) -> dict[str, list[str]]:
        """Chain kind -> rules, for the chains this bridge needs."""
        br = _quote(self.bridge)
        wanted: dict[str, list[str]] = {}
        nat: list[str] = []
        if self.ipv4_subnet is not None and self.ipv4_nat:
            nat.append(_nat_rule("ip", self.ipv4_subnet, self.ipv4_nat_address, br))
        if self.ipv6_subnet is not None and self.ipv6_nat:
            nat.append(_nat_rule("ip6", self.ipv6_subnet, self.ipv6_nat_address, br))
        if nat:
            wanted["pstrt"] = nat
        if self.firewall and (self.ipv4_subnet is not None or self.ipv6_subnet is not None):
            wanted["fwd"] = [f"iifname {br} accept", f"oifname {br} accept"]
            wanted["in"] = [
                f"iifname {br} udp dport {{ 53, 67, 547 }} accept",
                f"iifname {br} tcp dport 53 accept",
                f"iifname {br} icmp type {{ echo-request, destination-unreachable, "
                f"time-exceeded, parameter-problem }} accept",
                f"iifname {br} icmpv6 type {{ echo-request, destination-unreachable, "
                f"packet-too-big, time-exceeded, parameter-problem, nd-router-solicit, "
                f"nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report }} accept",
            ]
        for kind, rules in self.extra.items():
            if rules:
                wanted.setdefault(kind, []).extend(rules)
        return wanted


def _quote(name: str) -> str:
    return f'"{name}"'


def _chain_name(kind: str, bridge: str) -> str:
    return f"{kind}.{bridge}"


def _script(table: str, bridge: str, wanted: dict[str, list[str]]) -> str:
    lines = [f"add table inet {table}"]
    for kind, spec in _CHAINS.items():
        chain = _chain_name(kind, bridge)
        # add+flush makes the chain exist and empty whatever was there before; a chain
        # we no longer want is then deleted in the same transaction.
        lines.append(f"add chain inet {table} {chain} {{ {spec} }}")
        lines.append(f"flush chain inet {table} {chain}")
        if kind in wanted:
            lines.extend(f"add rule inet {table} {chain} {rule}" for rule in wanted[kind])
        else:
            lines.append(f"delete chain inet {table} {chain}")
    return "\n".join(lines) + "\n"


def apply_bridge_rules(table: str, rules: BridgeRules) -> None:
    """Atomically replace the bridge's chains in `table` with what `rules` need."""
    script = _script(table, rules.bridge, rules.chains())
    with _table_lock:
        run(["nft", "-f", "-"], input=script.encode())
        _drop_table_if_empty(table)


def remove_bridge_rules(table: str, bridge: str) -> None:
    """Remove the bridge's chains; remove the table too if no other chain is left."""
    with _table_lock:
        if not table_exists(table):
            return
        run(["nft", "-f", "-"], input=_script(table, bridge, {}).encode())
        _drop_table_if_empty(table)


def table_exists(table: str) -> bool:
    return run(["nft", "list", "table", "inet", table], check=False).returncode == 0


def list_chains(table: str) -> dict[str, str]:
    """Chain name -> its text (`nft list chain`), for the chains in `table`."""
    result = run(["nft", "-j", "list", "table", "inet", table], check=False)
    if result.returncode != 0:
        return {}
    names = [
        item["chain"]["name"]
        for item in json.loads(result.stdout)["nftables"]
        if "chain" in item and item["chain"].get("table") == table
    ]
    return {
        name: run(["nft", "list", "chain", "inet", table, name]).stdout.decode() for name in names
    }


def _drop_table_if_empty(table: str) -> None:
    if table_exists(table) and not list_chains(table):
        run(["nft", "delete", "table", "inet", table], check=False)
