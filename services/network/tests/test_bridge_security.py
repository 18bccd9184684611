"""ACLs, forwards and NIC filters as the bridge writes them: the driver-neutral policy
(`croft.common.network_acl`) in LXD's order, turned into rules that the real nftables
loads into the bridge's own tables, and that a change replaces whole and a delete
removes."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest

from croft.common.errors import InvalidArgument
from croft.common.network_acl import Acl, AclRule, network_policy, parse_acl
from croft.common.network_forward import parse_forward
from croft.network.drivers import NetworkSecurity, NicFilter
from croft.network.drivers import _bridge_security as security_rules
from croft.network.drivers import _bridge_table as firewall


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"croft_test_{secrets.token_hex(3)}"
    yield name
    for family in ("inet", "bridge"):
        for table in firewall.tables(name, family):
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True)


def listed(family: str, table: str) -> str:
    return subprocess.run(
        ["nft", "list", "table", family, table], capture_output=True, text=True
    ).stdout


def rich_acl() -> Acl:
    return parse_acl(
        {
            "name": "web",
            "ingress": [
                {
                    "action": "allow",
                    "state": "enabled",
                    "protocol": "tcp",
                    "destination_port": "22, 80-90",
                },
                {"action": "drop", "state": "logged", "source": "10.1.0.0/16,fd00::/8"},
                {"action": "reject", "state": "enabled", "protocol": "icmp4", "icmp_type": "8"},
                {"action": "allow", "state": "disabled", "protocol": "udp"},
            ],
            "egress": [
                {
                    "action": "allow",
                    "state": "enabled",
                    "destination": "192.0.2.1-192.0.2.9",
                    "protocol": "udp",
                    "destination_port": "53",
                },
            ],
        }  # fmt: skip
    )


def test_the_policy_is_drops_then_rejects_then_allows_with_the_defaults() -> None:
    policy = network_policy(
        "br0",
        {"security.acls": "web", "security.acls.default.egress.action": "allow"},
        {"web": rich_acl()},
    )
    assert policy is not None
    assert [(r.direction, r.rule.action) for r in policy.rules] == [
        ("ingress", "drop"),
        ("ingress", "reject"),
        ("ingress", "allow"),
        ("egress", "allow"),
    ]
    assert policy.rules[0].log_prefix == "br0-ingress-1"
    assert policy.default_egress == "allow" and policy.default_ingress == "reject"
    assert network_policy("br0", {}, {}) is None


def test_the_rules_load_into_the_bridges_table_and_go_with_it(prefix: str) -> None:
    bridge = "crtsec" + secrets.token_hex(2)
    policy = network_policy("br0", {"security.acls": "web"}, {"web": rich_acl()})
    forward = parse_forward(
        {
            "listen_address": "10.9.8.1",
            "config": {"target_address": "10.9.8.7"},
            "ports": [
                {
                    "protocol": "tcp",
                    "listen_port": "8080,8443",
                    "target_port": "80",
                    "target_address": "10.9.8.5",
                }
            ],
        },  # fmt: skip
        {4: IPv4Network("10.9.8.0/24")},
    )
    nic = NicFilter(host_name="vethtest1", hwaddr="00:16:3e:00:00:01", mac=True,
                    ipv4="10.9.8.5", ipv4_filtering=True)  # fmt: skip
    secured = NetworkSecurity(acl=policy, forwards=(forward,), nics=(nic,))
    rules = firewall.BridgeRules(
        bridge=bridge,
        ipv4_subnet=IPv4Network("10.9.8.0/24"),
        ipv4_nat=True,
        extra=security_rules.inet_chains(bridge, secured),
        bridge_extra=security_rules.nic_chains(secured.nics),
    )
    firewall.apply(prefix, rules)
    table = firewall.table_name(prefix, bridge)
    inet = listed("inet", table)
    assert f"chain acl.{bridge}" in inet and f"jump acl.{bridge}" in inet
    assert "tcp dport { 22, 80-90 } accept" in inet
    assert "ip saddr 10.1.0.0/16" in inet and "ip6 saddr fd00::/8" in inet
    assert 'log prefix "br0-ingress-1 "' in inet
    # The disabled rule (any UDP in) is not there; the egress UDP 53 one is.
    assert "meta l4proto udp accept" not in inet
    assert "ip daddr 192.0.2.1-192.0.2.9 udp dport 53 accept" in inet
    assert "dnat ip to 10.9.8.5:80" in inet and "dnat ip to 10.9.8.7" in inet
    assert f'oifname "{bridge}" reject' in inet
    assert "ether saddr != 00:16:3e:00:00:01 drop" in listed("bridge", table)

    # Replaced whole: without security, only the bridge's own chains stay.
    firewall.apply(
        prefix, firewall.BridgeRules(bridge=bridge, ipv4_subnet=IPv4Network("10.9.8.0/24"))
    )
    inet = listed("inet", table)
    assert "acl." not in inet and "dnat" not in inet and f"fwd.{bridge}" in inet
    assert listed("bridge", table) == ""
    firewall.apply(prefix, rules)
    firewall.remove(prefix, bridge)
    assert listed("inet", table) == "" and listed("bridge", table) == ""


def test_named_subjects_are_refused_on_bridges() -> None:
    acl = parse_acl(
        {
            "name": "ext",
            "egress": [{"action": "allow", "state": "enabled", "destination": "@external"}],
        }  # fmt: skip
    )
    policy = network_policy("br0", {"security.acls": "ext"}, {"ext": acl})
    with pytest.raises(InvalidArgument, match="Unsupported nftables subject"):
        security_rules.acl_chains("br0", policy)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"action": "allow", "state": "enabled", "protocol": "tcp", "destination_port": "22-10"},
            "Start port 22 must be lower than end port 10",
        ),
        ({"action": "allow", "state": "on"}, "State must be one of: enabled, disabled, logged"),
        (
            {"action": "allow", "state": "enabled", "source": "10.0.0.1", "destination": "fd00::1"},
            "Conflicting IP family types used for Source and Destination",
        ),
        (
            {"action": "allow", "state": "enabled", "protocol": "icmp4", "source": "fd00::1"},
            'Cannot use IPv6 source addresses with "icmp4" protocol',
        ),
        (
            {"action": "allow", "state": "enabled", "destination": "web"},
            'Named subjects not allowed in "Destination" for "ingress" rules',
        ),
    ],  # fmt: skip
)
def test_bad_rules_are_refused_in_lxds_words(rule: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match="Invalid ingress rule 0: .*") as caught:
        parse_acl({"name": "web", "ingress": [rule]}, ["web"])
    assert message in caught.value.message
    assert AclRule.from_api(rule).to_api()["action"] == "allow"


def test_ipv6_filtering_allows_the_nics_slaac_address() -> None:
    subnet = IPv6Network("fd42:1:2:3::/64")
    assert str(security_rules.eui64(subnet, "00:16:3e:12:34:56")) == "fd42:1:2:3:216:3eff:fe12:3456"
    nic = NicFilter(host_name="vethx", hwaddr="00:16:3e:12:34:56", ipv6_filtering=True)
    rules = security_rules.nic_chains((nic,), subnet)["in"]
    assert 'iifname "vethx" ether type ip6 ip6 saddr fd42:1:2:3:216:3eff:fe12:3456 accept' in rules
    assert rules.index('iifname "vethx" ether type ip6 drop') > 0
