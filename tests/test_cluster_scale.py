"""`croft scale --member`: the control-plane services run on any members in any number
(the session's 3-member `cluster_rig`)."""

from __future__ import annotations

import json
from collections import Counter

from croft.common.testing.cluster import ClusterRig


def running(rig: ClusterRig, service: str) -> Counter[str]:
    """How many replicas of `service` each member runs, as discovery shows them."""
    status = json.loads(rig.members[0].croft("status", "--format", "json", check=False).stdout)
    return Counter(i["member"] for i in status["instances"] if i["service"] == service)


def test_control_plane_replicas_move_between_members_from_any_member(
    cluster_rig: ClusterRig,
) -> None:
    rig = cluster_rig
    rig.wait_online(120)
    m1, m2, m3 = rig.members[:3]
    try:
        m1.croft("scale", "--member", m2.name, "images=2")
        assert running(rig, "images")[m2.name] == 2
        m1.croft("scale", "--member", m2.name, "images=0")
        m1.croft("scale", "--member", m3.name, "images=0")
        assert running(rig, "images") == {m1.name: 1}
        # m2's api still answers for images with no images service of its own.
        assert rig.lxc(1, "image", "list", "m2:", "--format", "csv").returncode == 0

        # The last replica in the cluster cannot go; unknown members and per-host
        # services are refused (each before it records anything).
        refused = m2.croft("scale", "--member", m1.name, "images=0", check=False)
        assert refused.returncode == 1 and "images would run nowhere" in refused.stderr
        refused = m1.croft("scale", "--member", "nope", "images=1", check=False)
        assert refused.returncode == 1 and 'Cluster member "nope" not found' in refused.stderr
        refused = m1.croft("scale", "--member", m2.name, "compute=2", check=False)
        assert "compute runs exactly once per host" in refused.stderr
    finally:
        m1.croft("scale", "--member", m2.name, "images=1")
        m1.croft("scale", "--member", m3.name, "images=1")
    assert running(rig, "images") == {m1.name: 1, m2.name: 1, m3.name: 1}
    assert running(rig, "compute") == {m1.name: 1, m2.name: 1, m3.name: 1}
