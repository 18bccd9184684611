"""A network's ACL policy as OVN port groups and ACLs (LXD's `acl_ovn.go`), pure.

Each ACL a network names is a port group holding the network's instance ports, its
rules that group's ACL rows; one more group per network holds the same ports, the
default action of each direction and the baseline every filtered port needs (ARP and
neighbour discovery, DHCP, DNS and ping to the network's router and DNS servers, the
packets a reject sends). An ingress rule is a `to-lport` ACL on `outport == @<group>`,
an egress one a `from-lport` ACL on `inport == @<group>`: OVN evaluates them in two
stages, so traffic between two filtered instances passes the sender's egress rules and
then the receiver's ingress rules (one stage for both, as LXD 5.0 has it, would let the
two defaults race at one priority). Priorities keep LXD's order, drops before rejects
before allows before the default; an allow is `allow-related`, so replies pass.

Group names are OVN identifiers (no hyphen), derived from the network's and the ACL's
names; every group carries `external_ids:croft-network`, so the network's delete finds
them, and an ACL row goes with its group (ACLs are not root rows in OVN's schema).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from croft.common.errors import InvalidArgument
from croft.common.network_acl import NetworkAclPolicy, PolicyRule

PRIORITY_BASELINE = 32767
PRIORITY = {"drop": 40, "reject": 30, "allow": 20}
PRIORITY_DEFAULT = 10
PRIORITY_NIC_DEFAULT = 11


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def network_group(network: str) -> str:
    """The network's own port group: every instance port, the defaults."""
    return f"croft_net_{_tag(network)}"


def acl_group(network: str, acl: str) -> str:
    """The port group of one ACL on one network."""
    return f"croft_acl_{_tag(network)}_{_tag(acl)}"


@dataclass(frozen=True)
class OvnAcl:
    """One ACL row."""

    priority: int
    match: str
    action: str
    log_name: str = ""
    direction: str = "to-lport"

    def columns(self, network: str) -> dict[str, Any]:
        cols: dict[str, Any] = {
            "direction": self.direction,
            "priority": self.priority,
            "match": self.match,
            "action": self.action,
            "external_ids": {"croft-network": network},
        }
        if self.log_name:
            cols.update(log=True, name=self.log_name, severity="info")
        return cols


def nic_group(network: str, port: str) -> str:
    """The port group of one NIC with ACLs of its own: its default actions."""
    return f"croft_nic_{_tag(network)}_{_tag(port)}"


@dataclass(frozen=True)
class PortGroup:
    name: str
    acl: str  # "" for the network's own group
    acls: tuple[OvnAcl, ...] = field(default=())
    # The logical switch ports in it; None: every instance port of the network (a port
    # added later joins it too).
    ports: tuple[str, ...] | None = None
    nic: str = ""  # the port whose own defaults the group holds

    def external_ids(self, network: str) -> dict[str, str]:
        ids = {"croft-network": network}
        if self.acl:
            ids["croft-acl"] = self.acl
        if self.nic:
            ids["croft-nic"] = self.nic
        if self.ports is None:
            ids["croft-all"] = "true"
        return ids


def _action(action: str) -> str:
    return "allow-related" if action == "allow" else action


def port_groups(
    network: str,
    policy: NetworkAclPolicy | None,
    router_port: str,
    services: list[str],
    nics: Sequence[tuple[str, NetworkAclPolicy]] = (),
) -> list[PortGroup]:
    """The port groups (with their ACLs) that enforce `policy` on `network`, and each
    NIC's own policy in `nics` (its logical switch port, its policy) on that NIC, in
    addition (a NIC's default actions win over the network's). `router_port` is the
    router's switch port; `services` are the addresses of the router and of the DNS
    servers, which instances may always ping and ask. Empty when nothing is filtered.
    InvalidArgument for a rule OVN cannot express here."""
    if policy is None and not nics:
        return []
    net = network_group(network)
    members: dict[str, set[str] | None] = {}
    rules: dict[str, list[PolicyRule]] = {}
    for port, nic_policy in ([("", policy)] if policy is not None else []) + list(nics):
        for item in nic_policy.rules:
            if item.acl not in rules:
                rules[item.acl] = [r for r in nic_policy.rules if r.acl == item.acl]
            if not port:
                members[item.acl] = None
            else:
                found = members.setdefault(item.acl, set())
                if found is not None:
                    found.add(port)
    groups = {name: acl_group(network, name) for name in rules}
    out = [
        PortGroup(
            groups[name],
            name or "-",
            tuple(_rule(item, net, groups, router_port) for item in rules[name]),
            None if members[name] is None else tuple(sorted(members[name] or ())),
        )
        for name in sorted(rules)
    ]
    baseline = list(_baseline(net, router_port, services))
    if policy is not None:
        baseline += _defaults(net, f"@{net}", policy, PRIORITY_DEFAULT)
    filtered = None if policy is not None else tuple(sorted(p for p, _ in nics))
    out.append(PortGroup(net, "", tuple(baseline), filtered))
    for port, nic_policy in nics:
        group = nic_group(network, port)
        out.append(
            PortGroup(
                group,
                "",
                _defaults(group, f"@{group}", nic_policy, PRIORITY_NIC_DEFAULT),
                (port,),
                nic=port,
            )
        )
    return out


def _defaults(
    log_tag: str, ports: str, policy: NetworkAclPolicy, priority: int
) -> tuple[OvnAcl, ...]:
    """The default action of each direction for the ports `ports` names."""
    return (
        OvnAcl(
            priority,
            f"outport == {ports}",
            _action(policy.default_ingress),
            f"{log_tag}-ingress-default"[:63] if policy.default_ingress_logged else "",
        ),
        OvnAcl(
            priority,
            f"inport == {ports}",
            _action(policy.default_egress),
            f"{log_tag}-egress-default"[:63] if policy.default_egress_logged else "",
            direction="from-lport",
        ),
    )


def _baseline(net: str, router_port: str, services: list[str]) -> tuple[OvnAcl, ...]:
    rp = f'"{router_port}"'
    out = f"outport == @{net}"
    inp = f"inport == @{net}"
    returned = [
        # The packets a reject sends back, which must not be rejected in turn.
        "icmp6 && icmp6.type == {1, 2, 3, 4} && ip.ttl == 255",
        "icmp4 && icmp4.type == {3, 11, 12} && ip.ttl == 255",
        "tcp && tcp.flags == 0x014",
    ]
    ingress = [
        f"{out} && (arp || nd)",
        f"{out} && inport == {rp} && nd_ra",
        *(f"{out} && {m}" for m in returned),
    ]
    egress = [
        f"{inp} && (arp || nd)",
        f"{inp} && nd_rs",
        # DHCP, which OVN answers after this stage.
        f"{inp} && ((ip4 && udp.dst == 67) || (ip6 && udp.dst == 547))",
        *(f"{inp} && {m}" for m in returned),
    ]
    for text in services:
        ip = ipaddress.ip_interface(text).ip
        v = ip.version
        icmp = "icmp4.type == 8" if v == 4 else "icmp6.type == 128"
        # Ping and DNS to the router and the DNS servers the network's DHCP names.
        egress.append(f"{inp} && ip{v}.dst == {ip} && {icmp}")
        egress.append(f"{inp} && ip{v}.dst == {ip} && (udp.dst == 53 || tcp.dst == 53)")
    rows = [OvnAcl(PRIORITY_BASELINE, m, "allow") for m in ingress]
    rows += [OvnAcl(PRIORITY_BASELINE, m, "allow", direction="from-lport") for m in egress]
    return tuple(rows)


def _rule(item: PolicyRule, net: str, groups: dict[str, str], router_port: str) -> OvnAcl:
    rule = item.rule
    own = groups.get(item.acl, net) if item.acl else net
    port = "outport" if item.direction == "ingress" else "inport"
    parts = [f"{port} == @{own}"]
    # The subjects on the other side: ingress rules name where traffic comes from in
    # `source`, egress ones where it goes in `destination`.
    for text, side in ((rule.source, "src"), (rule.destination, "dst")):
        if text:
            parts.append(_subjects(text, side, net, groups, router_port))
    icmp = {"icmp4": 4, "icmp6": 6}.get(rule.protocol)
    if rule.protocol in ("tcp", "udp"):
        parts.append(rule.protocol)
        if rule.source_port:
            parts.append(_ports(rule.protocol, "src", rule.source_port))
        if rule.destination_port:
            parts.append(_ports(rule.protocol, "dst", rule.destination_port))
    elif icmp is not None:
        name = f"icmp{icmp}"
        parts.append(name)
        if rule.icmp_type:
            parts.append(f"{name}.type == {int(rule.icmp_type)}")
        if rule.icmp_code:
            parts.append(f"{name}.code == {int(rule.icmp_code)}")
    return OvnAcl(
        PRIORITY[rule.action],
        " && ".join(parts),
        _action(rule.action),
        item.log_prefix,
        direction="to-lport" if item.direction == "ingress" else "from-lport",
    )


def _subjects(text: str, side: str, net: str, groups: dict[str, str], router_port: str) -> str:
    """One side's subjects as an OVN expression: addresses by family, named subjects by
    the ports traffic enters (`src`) or leaves (`dst`) the switch through."""
    port = "inport" if side == "src" else "outport"
    terms: list[str] = []
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for subject in (s.strip() for s in text.split(",")):
        if subject == "@internal":
            terms.append(f"{port} == @{net}")
        elif subject == "@external":
            terms.append(f'{port} == "{router_port}"')
        elif subject in groups:
            terms.append(f"{port} == @{groups[subject]}")
        elif subject.startswith("@") or _is_name(subject):
            raise InvalidArgument(
                f"Unsupported OVN subject {subject!r}: an ACL named as a subject must be "
                "applied to the network too"
            )
        else:
            for cidr in _cidrs(subject):
                by_family[cidr.version].append(str(cidr))
    for version, cidrs in by_family.items():
        if cidrs:
            terms.append(f"ip{version}.{side} == {{{', '.join(cidrs)}}}")
    return terms[0] if len(terms) == 1 else "(" + " || ".join(terms) + ")"


def _is_name(subject: str) -> bool:
    try:
        _cidrs(subject)
    except ValueError:
        return True
    return False


def _cidrs(subject: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    start, sep, end = subject.partition("-")
    if sep:
        first, last = ipaddress.ip_address(start), ipaddress.ip_address(end)
        return list(ipaddress.summarize_address_range(first, last))  # type: ignore[arg-type,unused-ignore]
    return [ipaddress.ip_network(subject, strict=False)]


def _ports(protocol: str, side: str, text: str) -> str:
    terms = []
    for part in (p.strip() for p in text.split(",")):
        first, sep, last = part.partition("-")
        if sep:
            terms.append(f"({protocol}.{side} >= {int(first)} && {protocol}.{side} <= {int(last)})")
        else:
            terms.append(f"{protocol}.{side} == {int(first)}")
    return terms[0] if len(terms) == 1 else "(" + " || ".join(terms) + ")"


__all__ = ["OvnAcl", "PortGroup", "acl_group", "network_group", "nic_group", "port_groups"]
