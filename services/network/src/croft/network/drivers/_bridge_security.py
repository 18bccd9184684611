"""nftables rules for a bridge's ACLs, forwards and NIC filters, from the driver-neutral
`NetworkSecurity`: LXD's own rules (`drivers_nftables.go` and its templates), chains
named as LXD names them.

- ACLs: a regular chain `acl.<bridge>` holding the policy (established traffic first,
  then drops, rejects, allows, then the default action per direction), jumped to from
  `aclin`/`aclout`/`aclfwd` (input, output, forward hooks) for traffic entering or leaving
  the bridge; DHCP, DNS and core ICMP to and from the host stay allowed.
- Forwards: DNAT in `prert.<bridge>` (traffic arriving from elsewhere) and
  `out.<bridge>` (the host's own connections), and a masquerade in `pstrt.<bridge>` for
  an instance reaching its own forward (hairpin).
- NIC filters: chains in the bridge's `bridge`-family table, per filtered NIC, dropping
  frames whose source MAC, ARP sender or IP source is not the NIC's own.
"""

from __future__ import annotations

import ipaddress

from croft.common.errors import InvalidArgument
from croft.common.network_acl import NetworkAclPolicy, PolicyRule, subject_version
from croft.common.network_forward import Forward
from croft.network.drivers import NetworkSecurity, NicFilter


def _q(name: str) -> str:
    return f'"{name}"'


def acl_chains(bridge: str, policy: NetworkAclPolicy | None) -> dict[str, list[str]]:
    """Chain kind -> rules, for the inet table (empty when there is no policy)."""
    if policy is None:
        return {}
    br = _q(bridge)
    jump = f"jump acl.{bridge}"
    rules = ["ct state established,related accept"]
    for item in policy.rules:
        rules.extend(_policy_rule(br, item))
    for direction, action, logged in (
        ("egress", policy.default_egress, policy.default_egress_logged),
        ("ingress", policy.default_ingress, policy.default_ingress_logged),
    ):
        log = f'log prefix "{bridge}-{direction} " ' if logged else ""
        iface = "oifname" if direction == "ingress" else "iifname"
        rules.append(f"{iface} {br} {log}{_action(action)}")
    return {
        "acl": rules,
        "aclin": [
            f"iifname {br} tcp dport 53 accept",
            f"iifname {br} udp dport 53 accept",
            f"iifname {br} udp dport 67 accept",
            f"iifname {br} udp dport 547 accept",
            f"iifname {br} icmp type {{ 3, 11, 12 }} accept",
            f"iifname {br} icmpv6 type {{ 1, 2, 3, 4, 133, 135, 136, 143 }} accept",
            f"iifname {br} {jump}",
        ],
        "aclout": [
            f"oifname {br} udp sport 67 accept",
            f"oifname {br} udp sport 547 accept",
            f"oifname {br} icmp type {{ 3, 11, 12 }} accept",
            f"oifname {br} icmpv6 type {{ 1, 2, 3, 4, 128, 134, 135, 136, 143 }} accept",
            f"oifname {br} {jump}",
        ],
        "aclfwd": [f"iifname {br} {jump}", f"oifname {br} {jump}"],
    }


def _action(action: str) -> str:
    return "accept" if action == "allow" else action


def _policy_rule(br: str, item: PolicyRule) -> list[str]:
    """LXD's `aclRuleCriteriaToRules`: one rule for IPv4 subjects and one for IPv6 ones
    (a rule without subjects matches both families in one nftables rule)."""
    rule = item.rule
    for text in (rule.source, rule.destination):
        for subject in filter(None, text.split(",")):
            if subject_version(subject) == 0:
                # Named subjects (other ACLs, @internal, @external) are OVN's.
                raise InvalidArgument(f"Unsupported nftables subject {subject!r}")
    icmp = {"icmp4": 4, "icmp6": 6}.get(rule.protocol)
    if not rule.source and not rule.destination:
        versions: list[int | None] = [icmp]
    else:
        versions = [4, 6]
    out = []
    for version in versions:
        if icmp is not None and version is not None and version != icmp:
            continue
        args = ["oifname" if item.direction == "ingress" else "iifname", br]
        fits = True
        for field, text in (("saddr", rule.source), ("daddr", rule.destination)):
            if not text:
                continue
            mine = [s for s in text.split(",") if subject_version(s) == version]
            if not mine:
                fits = False
                break
            args.append(f"{'ip' if version == 4 else 'ip6'} {field} {{ {', '.join(mine)} }}")
        if not fits:
            continue
        if rule.protocol in ("tcp", "udp"):
            args.append(f"meta l4proto {rule.protocol}")
            if rule.source_port:
                args.append(f"th sport {{ {rule.source_port.replace(',', ', ')} }}")
            if rule.destination_port:
                args.append(f"th dport {{ {rule.destination_port.replace(',', ', ')} }}")
        elif icmp is not None:
            name = "icmp" if icmp == 4 else "icmpv6"
            args.append(f"meta l4proto {name}")
            if rule.icmp_type:
                args.append(f"{name} type {rule.icmp_type}")
                if rule.icmp_code:
                    args.append(f"{name} code {rule.icmp_code}")
        if item.log_prefix:
            args.append(f'log prefix "{item.log_prefix} "')
        args.append(_action(rule.action))
        out.append(" ".join(args))
    return out


def forward_chains(bridge: str, forwards: tuple[Forward, ...]) -> dict[str, list[str]]:
    """Chain kind -> rules for the forwards: port rules first, then default targets."""
    dnat: list[str] = []
    hairpin: list[str] = []
    for forward in forwards:
        family = "ip" if forward.listen.version == 4 else "ip6"
        for m in forward.port_maps():
            listen = _ports(m.listen_ports)
            dest = _dest(
                m.target, _ports(m.target_ports) if m.target_ports != m.listen_ports else ""
            )
            dnat.append(
                f"{family} daddr {forward.listen_address} {m.protocol} dport {listen} "
                f"dnat {family} to {dest}"
            )
            hairpin.append(
                f"{family} saddr {m.target} {family} daddr {m.target} {m.protocol} dport "
                f"{_ports(m.target_ports)} masquerade"
            )
    for forward in forwards:
        target = forward.default_target
        if target is None:
            continue
        family = "ip" if target.version == 4 else "ip6"
        dnat.append(f"{family} daddr {forward.listen_address} dnat {family} to {target}")
        hairpin.append(f"{family} saddr {target} {family} daddr {target} masquerade")
    if not dnat:
        return {}
    return {"prert": dnat, "out": list(dnat), "pstrt": hairpin}


def _ports(ports: tuple[int, int]) -> str:
    first, last = ports
    return str(first) if first == last else f"{first}-{last}"


def _dest(target: ipaddress.IPv4Address | ipaddress.IPv6Address, ports: str) -> str:
    if not ports:
        return str(target)
    return f"{target}:{ports}" if target.version == 4 else f"[{target}]:{ports}"


def eui64(subnet: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The SLAAC address a NIC with MAC `mac` takes in a /64 (EUI-64, as LXD derives it
    for IPv6 filtering)."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    iid = bytes(octets[:3] + [0xFF, 0xFE] + octets[3:])
    return ipaddress.IPv6Address(int(subnet.network_address) | int.from_bytes(iid, "big"))


def nic_chains(
    nics: tuple[NicFilter, ...], ipv6_subnet: ipaddress.IPv6Network | None = None
) -> dict[str, list[str]]:
    """Chain kind -> rules for the bridge-family table: LXD's instance bridge filter, on
    the input and forward hooks (frames to the host and to other ports). A NIC with IPv6
    filtering may use its pinned IPv6 address, else its SLAAC one in `ipv6_subnet`."""
    rules: list[str] = []
    for nic in nics:
        host = _q(nic.host_name)
        mac = nic.hwaddr.lower()
        if nic.mac:
            rules.append(f"iifname {host} ether saddr != {mac} drop")
            rules.append(f"iifname {host} ether type arp arp saddr ether != {mac} drop")
        if nic.ipv4_filtering:
            if nic.ipv4:
                rules.append(
                    f"iifname {host} ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 "
                    "udp dport 67 accept"
                )
                rules.append(f"iifname {host} ether type arp arp saddr ip {nic.ipv4} accept")
                rules.append(f"iifname {host} ether type ip ip saddr {nic.ipv4} accept")
            rules.append(f"iifname {host} ether type arp drop")
            rules.append(f"iifname {host} ether type ip drop")
        if nic.ipv6_filtering:
            rules.append(
                f"iifname {host} ether type ip6 ip6 saddr fe80::/10 ip6 daddr ff02::1:2 "
                "udp dport 547 accept"
            )
            rules.append(
                f"iifname {host} ether type ip6 ip6 saddr fe80::/10 ip6 daddr ff02::2 "
                "icmpv6 type 133 accept"
            )
            rules.append(f"iifname {host} ether type ip6 icmpv6 type 134 drop")
            own = nic.ipv6
            if not own and ipv6_subnet is not None and ipv6_subnet.prefixlen == 64:
                own = str(eui64(ipv6_subnet, nic.hwaddr))
            if own:
                rules.append(f"iifname {host} ether type ip6 ip6 saddr {own} accept")
            rules.append(f"iifname {host} ether type ip6 ip6 saddr fe80::/10 accept")
            rules.append(f"iifname {host} ether type ip6 drop")
        if nic.mac or nic.ipv4_filtering or nic.ipv6_filtering:
            rules.append(f"iifname {host} ether type != {{ arp, ip, ip6 }} drop")
    if not rules:
        return {}
    return {"in": rules, "fwd": list(rules)}


def inet_chains(bridge: str, security: NetworkSecurity) -> dict[str, list[str]]:
    """Every inet chain `security` needs (to be merged with the bridge's own)."""
    chains = acl_chains(bridge, security.acl)
    for kind, rules in forward_chains(bridge, security.forwards).items():
        chains.setdefault(kind, []).extend(rules)
    return chains
