"""ACLs as the OVN driver writes them (`drivers/_ovn_acl.py`): the driver-neutral policy
turned into port groups and OVN ACL rows. The OVN side (rows in a real NB, traffic
through them) is `tests/test_ovn.py`'s; these pin the translation of each kind of
subject, port and protocol, and what is refused."""

from __future__ import annotations

import pytest

from croft.common.errors import InvalidArgument
from croft.common.network_acl import Acl, network_policy, parse_acl
from croft.network.drivers import _ovn_acl as ovn_acl

ROUTER = "croft-net-o1-ls-int-lsp-router"


def acl(
    name: str, ingress: list[dict[str, str]], egress: list[dict[str, str]] | None = None
) -> Acl:
    return parse_acl({"name": name, "ingress": ingress, "egress": egress or []}, [name])


def matches(groups: list[ovn_acl.PortGroup]) -> dict[str, tuple[str, str, int]]:
    return {a.match: (a.action, a.direction, a.priority) for g in groups for a in g.acls}


def test_rules_subjects_ports_and_defaults() -> None:
    ssh = acl(
        "ssh",
        [
            {
                "state": "enabled",
                "action": "allow",
                "protocol": "tcp",
                "destination_port": "22,1000-1002",
                "source": "10.0.0.1-10.0.0.4,@external",
            },  # fmt: skip
            {
                "state": "enabled",
                "action": "drop",
                "protocol": "icmp4",
                "icmp_type": "8",
                "source": "@internal",
            },
        ],
        [{"state": "enabled", "action": "reject", "destination": "192.0.2.0/24,2001:db8::/64"}],
    )
    config = {"security.acls": "ssh", "security.acls.default.egress.action": "allow"}
    policy = network_policy("o1", config, {"ssh": ssh})
    groups = ovn_acl.port_groups("o1", policy, ROUTER, ["10.1.1.1/24"])
    net, own = ovn_acl.network_group("o1"), ovn_acl.acl_group("o1", "ssh")
    assert [g.name for g in groups] == [own, net]
    assert all(g.ports is None for g in groups)  # every port of the network
    found = matches(groups)
    assert found[
        f'outport == @{own} && (inport == "{ROUTER}" || ip4.src == {{10.0.0.1/32, 10.0.0.2/31, 10.0.0.4/32}}) && tcp && '
        "(tcp.dst == 22 || (tcp.dst >= 1000 && tcp.dst <= 1002))"
    ] == ("allow-related", "to-lport", 20)
    assert found[f"outport == @{own} && inport == @{net} && icmp4 && icmp4.type == 8"] == (
        "drop", "to-lport", 40,
    )  # fmt: skip
    assert found[
        f"inport == @{own} && (ip4.dst == {{192.0.2.0/24}} || ip6.dst == {{2001:db8::/64}})"
    ] == ("reject", "from-lport", 30)
    # The defaults, below every rule: LXD's reject in, the configured allow out.
    assert found[f"outport == @{net}"] == ("reject", "to-lport", 10)
    assert found[f"inport == @{net}"] == ("allow-related", "from-lport", 10)
    # DNS and ping to the router stay open whatever the rules.
    assert found[f"inport == @{net} && ip4.dst == 10.1.1.1 && icmp4.type == 8"][0] == "allow"


def test_a_nics_own_acls_filter_its_port_only() -> None:
    web = acl(
        "web",
        [{"state": "enabled", "action": "allow", "protocol": "tcp", "destination_port": "80"}],
    )
    nic = network_policy("o1", {"security.acls": "web"}, {"web": web})
    assert nic is not None
    groups = ovn_acl.port_groups("o1", None, ROUTER, [], [("port-a", nic)])
    by_name = {g.name: g for g in groups}
    assert by_name[ovn_acl.acl_group("o1", "web")].ports == ("port-a",)
    assert by_name[ovn_acl.network_group("o1")].ports == ("port-a",)
    own = by_name[ovn_acl.nic_group("o1", "port-a")]
    assert own.ports == ("port-a",) and {a.priority for a in own.acls} == {11}
    assert ovn_acl.port_groups("o1", None, ROUTER, []) == []


def test_an_acl_named_as_a_subject_must_be_applied_too() -> None:
    other = acl("other", [])
    uses = parse_acl(
        {"name": "uses", "ingress": [{"state": "enabled", "action": "allow", "source": "other"}]},
        ["uses", "other"],
    )
    policy = network_policy("o1", {"security.acls": "uses"}, {"uses": uses, "other": other})
    with pytest.raises(InvalidArgument, match="Unsupported OVN subject 'other'"):
        ovn_acl.port_groups("o1", policy, ROUTER, [])
