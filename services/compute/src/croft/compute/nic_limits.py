"""NIC bandwidth limits (LXD's `limits.ingress`, `limits.egress`, `limits.max` on a NIC),
on the NIC's host-side interface with tc, as LXD's `networkSetupHostVethLimits`: what
the instance receives leaves the host side, so `limits.ingress` is an HTB class on that
side's root; what it sends enters the host side, so `limits.egress` limits that side's
ingress.

LXD polices that ingress (`action police`); this kernel has no police action
(CONFIG_NET_ACT_POLICE), so the ingress is redirected (`action mirred`) to an IFB device
of its own, `ifb<hash>`, shaped by an HTB class there. That device outlives the veth
when the instance stops: `release` removes it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from croft.common.instance_config import parse_bit_rate
from croft.common.proc import run

LIMIT_KEYS = ("limits.ingress", "limits.egress", "limits.max")


def has_limits(device: Mapping[str, str]) -> bool:
    return any(device.get(key) for key in LIMIT_KEYS)


def ifb_name(host_name: str) -> str:
    """The IFB device shaping what `host_name` receives (15 characters at most)."""
    return "ifb" + hashlib.sha256(host_name.encode()).hexdigest()[:10]


def _exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _htb(dev: str, rate: str) -> None:
    run(["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:0", "htb", "default", "10"])
    run(["tc", "class", "add", "dev", dev, "parent", "1:0", "classid", "1:10", "htb", "rate", rate])


def apply(host_name: str, device: Mapping[str, str]) -> None:
    """Make `host_name`'s qdiscs hold exactly the NIC's limits (none: none, and no IFB
    left). Does nothing when the interface does not exist (the instance is not
    running)."""
    if not host_name or not _exists(host_name):
        return
    ingress = device.get("limits.max") or device.get("limits.ingress") or ""
    egress = device.get("limits.max") or device.get("limits.egress") or ""
    run(["tc", "qdisc", "del", "dev", host_name, "root"], check=False)
    run(["tc", "qdisc", "del", "dev", host_name, "ingress"], check=False)
    release(host_name)
    if ingress:
        _htb(host_name, f"{parse_bit_rate(ingress)}bit")
    if egress:
        ifb = ifb_name(host_name)
        run(["ip", "link", "add", ifb, "type", "ifb"])
        run(["ip", "link", "set", ifb, "up"])
        _htb(ifb, f"{parse_bit_rate(egress)}bit")
        run(["tc", "qdisc", "add", "dev", host_name, "handle", "ffff:0", "ingress"])
        run(
            [
                "tc", "filter", "add", "dev", host_name, "parent", "ffff:0", "protocol", "all",
                "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
                "dev", ifb,
            ]
        )  # fmt: skip


def release(host_name: str) -> None:
    """Remove the IFB device of `host_name`'s egress limit, if there is one."""
    ifb = ifb_name(host_name)
    if _exists(ifb):
        run(["ip", "link", "del", ifb], check=False)
