"""The store's voters on the session's 3-member `cluster_rig` (after the other cluster
tests: the tests here run in order and leave m1-m3 as the three voters again):

1. quorum lost (m2 and m3 killed for good): `croft cluster recover-from-quorum-loss` on
   m1 makes its store the cluster's alone, every record kept; the cluster answers again;
2. a joiner killed half-way through `croft init` (its learner added, its record made):
   the cluster keeps serving, the half member is not listed, and a retry of the join
   takes its place (no learner left behind);
3. the dropped voters come back as spares, and one is promoted while voters are missing;
   a voter that stays offline past `cluster.offline_threshold` is replaced by the online
   spare, and leaves the store.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from croft.common.testing.cluster import CROFT, ClusterRig, Member
from croft.common.testing.waiting import wait_until


@pytest.fixture(scope="module")
def rig(cluster_rig: ClusterRig, busybox_image: Path) -> Iterator[ClusterRig]:
    cluster_rig.wait_online(120)
    aliases = [a["name"] for a in cluster_rig.lxc_json(0, "image", "alias", "list", "m1:")]
    if "busybox" not in aliases:
        cluster_rig.lxc(0, "image", "import", str(busybox_image), "m1:", "--alias", "busybox")
    cluster_rig.lxc(0, "profile", "device", "remove", "m1:default", "eth0", check=False)
    cluster_rig.lxc(0, "config", "set", "cluster.offline_threshold", "11")
    yield cluster_rig
    cluster_rig.lxc(0, "config", "unset", "cluster.offline_threshold", check=False)
    cluster_rig.lxc(0, "config", "unset", "user.recovery", check=False)
    cluster_rig.lxc(0, "delete", "--force", "m1:rec1", check=False)


# The member joined for these tests (test 2), replaced as a voter in test 3.
_JOINER: list[Member] = []


def rows(rig: ClusterRig, via: int = 0) -> dict[str, dict[str, Any]]:
    return {r["server_name"]: r for r in rig.lxc_json(via, "cluster", "list")}


def voters(rig: ClusterRig) -> set[str] | None:
    """The members `lxc cluster list` shows as database voters (None if it fails)."""
    try:
        return {name for name, r in rows(rig).items() if "database" in r["roles"]}
    except AssertionError:
        return None


def _preseed(member: Member, token: str) -> str:
    return (
        f"cluster:\n  server_name: {member.name}\n  enabled: true\n"
        f"  server_address: {member.https}\n  cluster_token: {token}\n"
    )


def test_quorum_loss_is_recovered_from_the_surviving_member(rig: ClusterRig) -> None:
    m1, m2, m3 = rig.members
    rig.lxc(0, "config", "set", "user.recovery", "kept")
    rig.lxc(0, "init", "m1:busybox", "m1:rec1", "--target", "m1")
    m2.kill()
    m3.kill()
    # Refused while croft runs, as LXD refuses while its daemon runs.
    refused = m1.croft("cluster", "recover-from-quorum-loss", "--quiet", check=False)
    assert refused.returncode != 0 and "please stop it first" in refused.stderr
    m1.kill()
    wait_until(lambda: not m1.processes(), 30, "m1's processes gone")
    # Not confirmed: nothing done.
    aborted = m1.croft("cluster", "recover-from-quorum-loss", input="no\n", check=False)
    assert aborted.returncode != 0 and "Recover operation aborted" in aborted.stderr
    done = m1.croft("cluster", "recover-from-quorum-loss", input="yes\n")
    assert "Voters dropped from the store: m2, m3" in done.stdout
    m1.up()
    # The cluster answers with m1 alone as its store, every record kept.
    assert voters(rig) == {"m1"}
    shown = rows(rig)
    assert shown["m1"]["roles"] == ["database-leader", "database"]
    assert not shown["m2"]["database"] and not shown["m3"]["database"]
    assert rig.lxc(0, "config", "get", "user.recovery").stdout.strip() == "kept"
    listed = {r["name"]: r["location"] for r in rig.lxc_json(0, "list")}
    assert listed["rec1"] == "m1"
    rig.lxc(0, "config", "set", "user.recovery", "written after")


def test_a_joiner_killed_half_way_leaves_the_cluster_healthy_and_a_retry_joins(
    rig: ClusterRig,
) -> None:
    joiner = rig.extra_member()
    _JOINER.append(joiner)
    token = rig.lxc(0, "cluster", "add", joiner.name, "-q").stdout.strip().splitlines()[-1]
    init = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{joiner.netns}", *CROFT, "init", "--preseed"],
        env=joiner.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert init.stdin is not None
    init.stdin.write(_preseed(joiner, token))
    init.stdin.close()
    # Accepted (its learner in the store, its record made): killed before it is up.
    joined = joiner.state_dir / "cluster.yaml"
    wait_until(lambda: joined.exists() or init.poll() is not None, 120, "the join accepted", 0.02)

    def killed() -> bool:
        # Again until none is left: a process forked while the last pass ran survives it.
        joiner.kill()
        return not joiner.processes()

    wait_until(killed, 30, "the joiner's processes gone", 0.05)
    init.wait(30)
    assert joined.exists()
    # The cluster serves, and shows no half member.
    rig.lxc(0, "config", "set", "user.recovery", "after a dead joiner")
    assert sorted(rows(rig)) == ["m1", "m2", "m3"]
    # The retry (a new token for the same name) joins, in the dead join's place.
    rig.join(joiner)
    shown = wait_until(
        lambda: (r := rows(rig)) and r[joiner.name]["status"] == "Online" and r, 120, "Online"
    )
    assert sorted(shown) == ["m1", "m2", "m3", joiner.name]
    wait_until(lambda: voters(rig) == {"m1", joiner.name}, 120, "the joiner a voter")
    assert not any("database-standby" in r["roles"] for r in rows(rig).values())


def test_voters_are_replaced_and_missing_ones_promoted(rig: ClusterRig) -> None:
    m1, m2, m3 = rig.members
    (joiner,) = _JOINER
    # The voters dropped by the recovery come back as spares; with a voter missing the
    # first of them (lowest id) is promoted.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(m.up) for m in (m2, m3)]:
            started.result()
    wait_until(lambda: voters(rig) == {"m1", "m2", joiner.name}, 120, "m2 promoted")
    shown = rows(rig)
    assert shown["m3"]["roles"] == [] and shown["m3"]["status"] == "Online"
    # A voter offline past the threshold (11 s): the spare m3 takes its place.
    joiner.kill()
    wait_until(lambda: voters(rig) == {"m1", "m2", "m3"}, 180, "m3 replacing the dead voter")
    shown = rows(rig)
    assert shown[joiner.name]["status"] == "Offline" and not shown[joiner.name]["database"]
    rig.lxc(0, "cluster", "remove", joiner.name, "--force", "--yes")
    assert sorted(rows(rig)) == ["m1", "m2", "m3"]
    # The store still takes writes, through every member.
    for via in (0, 1, 2):
        rig.lxc(via, "config", "set", "user.recovery", f"through {via}")
