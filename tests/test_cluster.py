"""A croft cluster of three members (the `cluster_rig` fixture: network namespaces on a
test bridge, formed with `lxc cluster enable` and `croft init --preseed` join tokens),
driven by the real `lxc` 5.0.2 client over HTTPS with one trusted client certificate.

The fault test (a member's croft processes killed) runs last: it restarts that member.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from croft.common.testing.cluster import ClusterRig
from croft.common.testing.waiting import wait_until


def names(rows: list[dict]) -> list[str]:
    return sorted(r["server_name"] if "server_name" in r else r["name"] for r in rows)


@pytest.fixture(scope="module")
def rig(cluster_rig: ClusterRig, busybox_image: Path) -> Iterator[ClusterRig]:
    """The cluster, with the busybox image imported through m1. The rig's members run no
    managed network: the default profile's NIC goes."""
    cluster_rig.lxc(0, "image", "import", str(busybox_image), "m1:", "--alias", "busybox")
    cluster_rig.lxc(0, "profile", "device", "remove", "m1:default", "eth0", check=False)
    yield cluster_rig
    for row in cluster_rig.lxc_json(0, "list"):
        cluster_rig.lxc(0, "delete", "--force", f"m1:{row['name']}", check=False)


def member_rows(rig: ClusterRig, via: int) -> dict[str, dict]:
    return {r["server_name"]: r for r in rig.lxc_json(via, "cluster", "list")}


# ---------------------------------------------------------------------------- forming


def test_three_members_online_with_three_voters_and_one_leader(rig: ClusterRig) -> None:
    for via in range(3):
        rows = member_rows(rig, via)
        assert sorted(rows) == ["m1", "m2", "m3"]
        assert all(r["status"] == "Online" for r in rows.values()), rows
        assert all(r["message"] == "Fully operational" for r in rows.values())
        assert all("database" in r["roles"] and r["database"] for r in rows.values()), rows
        leaders = [n for n, r in rows.items() if "database-leader" in r["roles"]]
        assert len(leaders) == 1, rows
    member = json.loads(rig.lxc(1, "query", "m2:/1.0/cluster/members/m3").stdout)
    assert member["url"] == f"https://{rig.members[2].https}"
    cluster = json.loads(rig.lxc(2, "query", "m3:/1.0/cluster").stdout)
    assert cluster == {"server_name": "m3", "enabled": True, "member_config": []}
    server = json.loads(rig.lxc(1, "query", "m2:/1.0").stdout)
    assert server["environment"]["server_clustered"] is True
    assert server["environment"]["server_name"] == "m2"


def test_every_member_serves_the_cluster_certificate(rig: ClusterRig) -> None:
    """One client trust covers every member: they all present the cluster's certificate."""
    seen = set()
    for member in rig.members:
        pem = ssl.get_server_certificate((member.address, 8443))
        seen.add(ssl.PEM_cert_to_DER_cert(pem))
    assert len(seen) == 1
    for via in range(3):
        assert rig.lxc(via, "list").returncode == 0


def test_enabling_twice_is_refused(rig: ClusterRig) -> None:
    result = rig.lxc(0, "cluster", "enable", "m1", check=False)
    assert result.returncode != 0
    assert "already clustered" in result.stderr  # the client's words
    # The server's own refusal, as LXD 5.0.2 words it.
    result = rig.lxc(0, "query", "-X", "PUT", "-d", '{"server_name":"m1","enabled":true}',
                     "m1:/1.0/cluster", check=False)  # fmt: skip
    assert "This server is already clustered" in result.stderr


def test_a_join_token_in_lxds_format_listed_and_revoked(rig: ClusterRig) -> None:
    token = rig.lxc(0, "cluster", "add", "m9", "-q").stdout.strip().splitlines()[-1]
    decoded = json.loads(base64.b64decode(token))
    assert set(decoded) == {"server_name", "fingerprint", "addresses", "secret", "expires_at"}
    assert decoded["server_name"] == "m9"
    assert sorted(decoded["addresses"]) == sorted(m.https for m in rig.members)
    pem = ssl.get_server_certificate((rig.members[0].address, 8443))
    assert decoded["fingerprint"] == hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    listed = rig.lxc(1, "cluster", "list-tokens", "--format", "json")
    assert [t["ServerName"] for t in json.loads(listed.stdout)] == ["m9"]
    rig.lxc(2, "cluster", "revoke-token", "m9")
    assert json.loads(rig.lxc(0, "cluster", "list-tokens", "--format", "json").stdout) == []


def test_a_name_in_use_gets_no_token(rig: ClusterRig) -> None:
    result = rig.lxc(0, "cluster", "add", "m2", check=False)
    assert result.returncode != 0
    assert "The cluster already has a member with name: m2" in result.stderr


def _preseed(member_name: str, https: str, token: str) -> str:
    return (
        "cluster:\n"
        f"  server_name: {member_name}\n"
        "  enabled: true\n"
        f"  server_address: {https}\n"
        f"  cluster_token: {token}\n"
    )


def _raw_join(rig: ClusterRig, token: str, name: str, address: str) -> tuple[int, dict]:
    """croft's accepting side of a join, asked as an untrusted client."""
    import urllib.error
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    body = json.dumps({"token": token, "server_name": name, "server_address": address})
    request = urllib.request.Request(
        f"https://{rig.members[0].https}/internal/cluster/join", data=body.encode(),
        method="POST", headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_bad_tokens_are_refused_and_change_nothing(rig: ClusterRig) -> None:
    """Revoked, expired, reused-by-another-name and forged-fingerprint tokens: the joiner
    is refused and the cluster keeps its three members."""
    joiner = rig.spare_member()
    revoked = rig.lxc(0, "cluster", "add", joiner.name, "-q").stdout.strip().splitlines()[-1]
    rig.lxc(0, "cluster", "revoke-token", joiner.name)
    result = joiner.croft("init", "--preseed", input=_preseed(joiner.name, joiner.https, revoked),
                          check=False)  # fmt: skip
    assert result.returncode != 0
    assert "No matching cluster join operation found" in result.stderr

    # A token whose fingerprint is not the cluster's: the joiner stops before asking.
    good = rig.lxc(0, "cluster", "add", joiner.name, "-q").stdout.strip().splitlines()[-1]
    forged = json.loads(base64.b64decode(good))
    forged["fingerprint"] = "0" * 64
    forged_text = base64.b64encode(json.dumps(forged).encode()).decode()
    result = joiner.croft("init", "--preseed", input=_preseed(joiner.name, joiner.https, forged_text),
                          check=False)  # fmt: skip
    assert result.returncode != 0
    assert "Certificate fingerprint mismatch" in result.stderr
    rig.lxc(0, "cluster", "revoke-token", joiner.name)

    # An expired token.
    rig.lxc(0, "config", "set", "cluster.join_token_expiry", "1S")
    try:
        expired = rig.lxc(0, "cluster", "add", joiner.name, "-q").stdout.strip().splitlines()[-1]
    finally:
        rig.lxc(0, "config", "unset", "cluster.join_token_expiry")
    time.sleep(2)  # past its expiry: the point of this case, not a timing assertion
    result = joiner.croft("init", "--preseed", input=_preseed(joiner.name, joiner.https, expired),
                          check=False)  # fmt: skip
    assert result.returncode != 0
    assert "Token has expired" in result.stderr
    # Expired tokens are used up as well.
    assert json.loads(rig.lxc(0, "cluster", "list-tokens", "--format", "json").stdout) == []
    assert sorted(member_rows(rig, 0)) == ["m1", "m2", "m3"]
    assert not (joiner.state_dir / "cluster.yaml").exists()


def test_member_show_set_edit(rig: ClusterRig) -> None:
    """`lxc cluster show/get/set/unset/edit` through another member; a bad key changes
    nothing."""
    rig.lxc(1, "cluster", "set", "m3", "scheduler.instance", "manual")
    assert rig.lxc(0, "cluster", "get", "m3", "scheduler.instance").stdout.strip() == "manual"
    result = rig.lxc(0, "cluster", "set", "m3", "bogus.key", "1", check=False)
    assert result.returncode != 0
    assert 'Invalid cluster configuration key "bogus.key"' in result.stderr
    rig.lxc(2, "cluster", "unset", "m3", "scheduler.instance")
    shown = rig.lxc(0, "cluster", "show", "m3").stdout
    assert "scheduler.instance" not in shown
    edited = shown.replace("failure_domain: default", "failure_domain: az3").replace(
        'description: ""', "description: third"
    )
    subprocess.run(
        ["lxc", "cluster", "edit", "m2:m3"], input=edited, text=True, check=True,
        env={**os.environ, "HOME": str(rig.lxc_home), "LXD_DIR": "/nonexistent"},
        capture_output=True,
    )  # fmt: skip
    row = member_rows(rig, 0)["m3"]
    assert row["failure_domain"] == "az3" and row["description"] == "third"
    # The member-local addresses: each member shows its own.
    for via, member in enumerate(rig.members):
        got = rig.lxc(via, "config", "get", "core.https_address").stdout.strip()
        assert got == member.https


# ---------------------------------------------------------------------------- placement


def locations(rig: ClusterRig, via: int) -> dict[str, str]:
    return {r["name"]: r["location"] for r in rig.lxc_json(via, "list")}


def test_untargeted_instances_spread_over_the_members(rig: ClusterRig) -> None:
    made = [f"spread{i}" for i in range(6)]
    try:
        for name in made:
            remote = rig.members[made.index(name) % 3].name  # asked through every member
            rig.lxc(0, "init", f"{remote}:busybox", f"{remote}:{name}")
        counts = Counter(loc for n, loc in locations(rig, 1).items() if n in made)
        assert counts == {"m1": 2, "m2": 2, "m3": 2}
    finally:
        for name in made:
            rig.lxc(0, "delete", "--force", f"m1:{name}", check=False)


def test_a_manual_member_takes_no_untargeted_instance(rig: ClusterRig) -> None:
    rig.lxc(0, "cluster", "set", "m1", "scheduler.instance", "manual")
    made = ["manual0", "manual1", "manual2"]
    try:
        for name in made:
            rig.lxc(0, "init", "m1:busybox", f"m1:{name}")
        placed = locations(rig, 2)
        assert all(placed[n] != "m1" for n in made), placed
        # Targeted, it still takes one.
        rig.lxc(0, "init", "m1:busybox", "m1:manual3", "--target", "m1")
        made.append("manual3")
        assert locations(rig, 0)["manual3"] == "m1"
    finally:
        rig.lxc(0, "cluster", "unset", "m1", "scheduler.instance")
        for name in made:
            rig.lxc(0, "delete", "--force", f"m1:{name}", check=False)


def groups_of(rig: ClusterRig, via: int) -> dict[str, list[str]]:
    rows = rig.lxc_json(via, "cluster", "group", "list", f"{rig.members[via].name}:")
    return {g["name"]: g["members"] for g in rows}


def test_cluster_groups_place_instances_and_refuse_bad_input(rig: ClusterRig) -> None:
    """`lxc cluster group ...`: `default` holds every member; `--target @group` places in
    the group; `scheduler.instance=group` members take only group-targeted instances; bad
    input is refused as LXD words it and changes nothing."""
    default = json.loads(rig.lxc(0, "query", "m1:/1.0/cluster/groups/default").stdout)
    assert default == {"name": "default", "description": "Default cluster group",
                       "members": ["m1", "m2", "m3"]}  # fmt: skip
    rig.lxc(0, "cluster", "group", "create", "m1:gpu")
    made: list[str] = []
    try:
        for args, error in (
            (("group", "create", "m1:gpu"), "This cluster group already exists"),
            (("group", "create", "m1:bad_name"), "may not contain underscores"),
            (("group", "rename", "m1:default", "dflt"), 'The "default" group cannot be renamed'),
            (("group", "delete", "m1:default"), "The 'default' cluster group cannot be deleted"),
            (("group", "assign", "m1:m2", "nosuch"), "Cluster group not found"),
            (("group", "remove", "m1:m2", "default"), "need to belong to at least one group"),
        ):
            result = rig.lxc(1, "cluster", *args, check=False)
            assert result.returncode != 0 and error in result.stderr, (args, result.stderr)
        for target, error in (
            ("@gpu", "No suitable cluster member could be found"),
            ("@nosuch", 'Cluster group "nosuch" doesn\'t exist'),
        ):
            result = rig.lxc(0, "init", "m1:busybox", "m1:g0", "--target", target, check=False)
            assert result.returncode != 0 and error in result.stderr, result.stderr
        assert groups_of(rig, 2) == {"default": ["m1", "m2", "m3"], "gpu": []}
        assert "g0" not in locations(rig, 0)

        rig.lxc(0, "cluster", "group", "assign", "m1:m3", "default,gpu")
        assert groups_of(rig, 1)["gpu"] == ["m3"]
        rig.lxc(0, "cluster", "set", "m3", "scheduler.instance", "group")
        for name in ("g1", "g2"):
            rig.lxc(0, "init", "m1:busybox", f"m1:{name}", "--target", "@gpu")
            made.append(name)
        rig.lxc(0, "init", "m1:busybox", "m1:g3")  # untargeted: not on the group-only m3
        made.append("g3")
        placed = locations(rig, 1)
        assert placed["g1"] == placed["g2"] == "m3" and placed["g3"] != "m3", placed
        result = rig.lxc(0, "cluster", "group", "delete", "m1:gpu", check=False)
        assert "Only empty cluster groups can be removed" in result.stderr
        # `lxc cluster group edit`'s PUT: description and members, both ways.
        for members in (["m2", "m3"], ["m3"]):
            rig.lxc(1, "query", "-X", "PUT", "-d",
                    json.dumps({"description": "GPUs", "members": members}),
                    "m2:/1.0/cluster/groups/gpu")  # fmt: skip
            shown = json.loads(rig.lxc(0, "query", "m1:/1.0/cluster/groups/gpu").stdout)
            assert shown == {"name": "gpu", "description": "GPUs", "members": members}
        assert groups_of(rig, 0)["default"] == ["m1", "m2", "m3"]

        rig.lxc(2, "cluster", "group", "rename", "m3:gpu", "accel")
        assert json.loads(rig.lxc(0, "query", "m1:/1.0/cluster/members/m3").stdout)["groups"] == [
            "default", "accel"]  # fmt: skip
        rig.lxc(0, "cluster", "group", "remove", "m1:m3", "accel")
        rig.lxc(0, "cluster", "group", "delete", "m1:accel")
        assert groups_of(rig, 0) == {"default": ["m1", "m2", "m3"]}
    finally:
        rig.lxc(0, "cluster", "unset", "m3", "scheduler.instance", check=False)
        for name in made:
            rig.lxc(0, "delete", "--force", f"m1:{name}", check=False)
        for group in ("gpu", "accel"):
            rig.lxc(0, "cluster", "group", "remove", "m1:m3", group, check=False)
            rig.lxc(0, "cluster", "group", "delete", f"m1:{group}", check=False)


def test_target_unknown_member_is_refused(rig: ClusterRig) -> None:
    result = rig.lxc(0, "init", "m1:busybox", "m1:nowhere", "--target", "m7", check=False)
    assert result.returncode != 0
    assert "Cluster member not found" in result.stderr
    assert "nowhere" not in locations(rig, 0)


def test_an_instance_on_m2_is_worked_from_the_other_members(
    rig: ClusterRig, tmp_path: Path
) -> None:
    """`--target m2` from m1; then its journey from m1 and m3, which do not hold it."""
    rig.lxc(0, "launch", "m1:busybox", "m1:c2", "--target", "m2")
    for via in range(3):
        assert locations(rig, via)["c2"] == "m2"
    rows = {r["name"]: r for r in rig.lxc_json(2, "list")}
    assert rows["c2"]["status"] == "Running"
    out = rig.lxc(2, "exec", "m3:c2", "--", "echo", "hello from m2")
    assert out.stdout.strip() == "hello from m2"
    src = tmp_path / "in.txt"
    src.write_text("pushed through m1\n")
    rig.lxc(0, "file", "push", str(src), "m1:c2/root/in.txt")
    back = tmp_path / "back.txt"
    rig.lxc(2, "file", "pull", "m3:c2/root/in.txt", str(back))
    assert back.read_text() == "pushed through m1\n"
    rig.lxc(2, "snapshot", "m3:c2", "snap0")
    info = rig.lxc(0, "info", "m1:c2").stdout
    assert "snap0" in info and "Location: m2" in info
    rig.lxc(0, "stop", "m1:c2", "--force")
    assert {r["name"]: r for r in rig.lxc_json(2, "list")}["c2"]["status"] == "Stopped"
    rig.lxc(2, "start", "m3:c2")
    assert "c2" in rig.lxc(1, "info", "m2:c2", "--show-log").stdout


def statuses(rig: ClusterRig, via: int) -> dict[str, str]:
    return {r["name"]: r["status"] for r in rig.lxc_json(via, "list")}


def test_evacuate_stops_local_containers_and_restore_starts_them(rig: ClusterRig) -> None:
    """LXD 5.0's evacuation of containers on local storage: `auto` and `stop` ones are
    stopped where they are, a `migrate` one moves to another member and runs there; the
    member is Evacuated and takes no instance; restore starts those that were running and
    brings the moved one back. Bad input is refused and changes nothing."""
    rig.lxc(0, "launch", "m1:busybox", "m1:ev1", "--target", "m2")
    rig.lxc(0, "launch", "m1:busybox", "m1:ev2", "--target", "m2", "-c", "cluster.evacuate=stop")
    rig.lxc(0, "init", "m1:busybox", "m1:ev3", "--target", "m2")
    rig.lxc(0, "launch", "m1:busybox", "m1:ev5", "--target", "m2", "-c",
            "cluster.evacuate=migrate")  # fmt: skip
    made = ["ev1", "ev2", "ev3", "ev5"]
    try:
        result = rig.lxc(0, "cluster", "evacuate", "m9", "--force", check=False)
        assert "Cluster member not found" in result.stderr
        result = rig.lxc(0, "query", "-X", "POST", "-d", '{"action":"dance"}',
                         "m1:/1.0/cluster/members/m2/state", check=False)  # fmt: skip
        assert 'Unknown action "dance"' in result.stderr
        result = rig.lxc(0, "cluster", "restore", "m2", "--force", check=False)
        assert "Cluster member is already restored" in result.stderr
        assert member_rows(rig, 0)["m2"]["status"] == "Online"

        rig.lxc(2, "cluster", "evacuate", "m2", "--force")
        row = member_rows(rig, 0)["m2"]
        assert (row["status"], row["message"]) == ("Evacuated", "Unavailable due to maintenance")
        now = statuses(rig, 1)
        assert [now[n] for n in made] == ["Stopped", "Stopped", "Stopped", "Running"], now
        placed = locations(rig, 0)
        assert [placed[n] for n in made[:3]] == ["m2", "m2", "m2"]
        # `migrate`: moved to another member, and running there.
        assert placed["ev5"] in ("m1", "m3"), placed
        origin = rig.lxc(0, "config", "get", "m1:ev5", "volatile.evacuate.origin").stdout
        assert origin.strip() == "m2"
        result = rig.lxc(0, "cluster", "evacuate", "m2", "--force", check=False)
        assert "Cluster member is already evacuated" in result.stderr
        result = rig.lxc(0, "init", "m1:busybox", "m1:ev4", "--target", "m2", check=False)
        assert result.returncode != 0 and "Cluster member is evacuated" in result.stderr
        assert "ev4" not in locations(rig, 0)

        rig.lxc(0, "cluster", "restore", "m2", "--force")
        assert member_rows(rig, 1)["m2"]["status"] == "Online"
        now = statuses(rig, 2)
        assert [now[n] for n in made] == ["Running", "Running", "Stopped", "Running"], now
        assert locations(rig, 1)["ev5"] == "m2"  # moved back
        origin = rig.lxc(0, "config", "get", "m1:ev5", "volatile.evacuate.origin").stdout
        assert origin.strip() == ""
    finally:
        if member_rows(rig, 0)["m2"]["status"] == "Evacuated":
            rig.lxc(0, "cluster", "restore", "m2", "--force", check=False)
        for name in made:
            rig.lxc(0, "delete", "--force", f"m1:{name}", check=False)


def test_a_stopped_container_moves_between_members(rig: ClusterRig) -> None:
    """`lxc move c1 --target m3`: its root filesystem, snapshot and config go along;
    bad targets are refused and change nothing."""
    rig.lxc(0, "launch", "m1:busybox", "m1:mv1", "--target", "m2", "-c", "user.tag=kept")
    try:
        rig.lxc(1, "exec", "m2:mv1", "--", "sh", "-c", "echo moved > /root/x")
        rig.lxc(0, "stop", "m1:mv1", "--force")
        rig.lxc(0, "snapshot", "m1:mv1", "s0")
        for target, error in (("m9", "Cluster member not found"),
                              ("m2", 'already on cluster member "m2"')):  # fmt: skip
            result = rig.lxc(0, "move", "m1:mv1", "--target", target, check=False)
            assert result.returncode != 0 and error in result.stderr, result.stderr
        assert locations(rig, 0)["mv1"] == "m2"

        rig.lxc(2, "move", "m3:mv1", "--target", "m3")
        assert locations(rig, 1)["mv1"] == "m3"
        info = rig.lxc(0, "info", "m1:mv1").stdout
        assert "Location: m3" in info and "s0" in info, info
        assert rig.lxc(0, "config", "get", "m1:mv1", "user.tag").stdout.strip() == "kept"
        rig.lxc(0, "start", "m1:mv1")
        assert rig.lxc(0, "exec", "m1:mv1", "--", "cat", "/root/x").stdout.strip() == "moved"
    finally:
        rig.lxc(0, "delete", "--force", "m1:mv1", check=False)


def test_removing_a_member_that_holds_instances_is_refused(rig: ClusterRig) -> None:
    if "c2" not in locations(rig, 0):
        rig.lxc(0, "init", "m1:busybox", "m1:c2", "--target", "m2")
    result = rig.lxc(0, "cluster", "remove", "m2", check=False)
    assert result.returncode != 0
    assert "Node still has the following instances: c2" in result.stderr
    assert sorted(member_rows(rig, 0)) == ["m1", "m2", "m3"]


def _local_api(member, method: str, path: str, body: dict | None = None) -> dict:  # type: ignore[no-untyped-def]
    """A request on a member's unix socket, as LXD's join_api test makes it with curl."""
    argv = ["curl", "-s", "--unix-socket", str(member.state_dir / "unix.socket"), "-X", method,
            f"lxd{path}"]  # fmt: skip
    if body is not None:
        argv += ["-d", json.dumps(body)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out)


def _clustered(member) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(_local_api(member, "GET", "/1.0/cluster")["metadata"]["enabled"])
    except (subprocess.CalledProcessError, ValueError, KeyError):
        return False


def _server_name(member) -> str:  # type: ignore[no-untyped-def]
    try:
        return str(_local_api(member, "GET", "/1.0")["metadata"]["environment"]["server_name"])
    except (subprocess.CalledProcessError, ValueError, KeyError):
        return ""


def test_a_fourth_member_joins_by_lxds_join_api_is_renamed_and_removed(
    rig: ClusterRig,
) -> None:
    """A running standalone croft joins with a raw `PUT /1.0/cluster` (LXD's join API, as
    `lxd init` sends it). Beyond cluster.max_voters (3) it runs no etcd: it uses the
    voters'. Its token is single use. `lxc cluster remove` takes it out."""
    joiner = rig.spare_member()
    name = joiner.name
    joiner.up()
    token = rig.lxc(0, "cluster", "add", joiner.name, "-q").stdout.strip().splitlines()[-1]
    cert = ssl.get_server_certificate((rig.members[0].address, 8443))
    join = {
        "server_name": joiner.name, "enabled": True, "server_address": joiner.https,
        "cluster_address": rig.members[0].https, "cluster_certificate": cert,
        "cluster_password": token,
        "member_config": [{"entity": "storage-pool", "name": "default", "key": "source",
                           "value": ""}],
    }  # fmt: skip
    try:
        # Bad input, refused before any operation, as LXD words it; nothing changes.
        for change, error in (
            ({"cluster_certificate": ""}, "No target cluster member certificate provided"),
            ({"server_address": ""}, "No server address provided for this member"),
            ({"cluster_password": "sekret"}, "join token"),
            ({"server_name": "m9"}, "This member's name is"),
        ):
            reply = _local_api(joiner, "PUT", "/1.0/cluster", {**join, **change})
            assert reply["error_code"] == 400 and error in reply["error"], reply
        # A certificate that is not the cluster's: the operation fails before asking.
        own = (joiner.state_dir / "server.crt").read_text()
        reply = _local_api(joiner, "PUT", "/1.0/cluster", {**join, "cluster_certificate": own})
        failed = _local_api(joiner, "GET", f"{reply['operation']}/wait")["metadata"]
        assert failed["status"] == "Failure" and "does not match" in failed["err"], failed
        assert _local_api(joiner, "GET", "/1.0/cluster")["metadata"]["enabled"] is False
        assert not (joiner.state_dir / "cluster.yaml").exists()

        reply = _local_api(joiner, "PUT", "/1.0/cluster", join)
        assert reply["type"] == "async", reply
        assert reply["metadata"]["description"] == "Joining cluster"
        done = _local_api(joiner, "GET", f"{reply['operation']}/wait")
        assert done["metadata"]["status"] == "Success", done
        # It restarts into the cluster: Online once its node agent's heartbeats come.
        rows = wait_until(
            lambda: (r := member_rows(rig, 1)) and r.get(joiner.name, {}).get("status") == "Online"
            and r, 240, f"{joiner.name} online", interval=0.5)  # fmt: skip
        wait_until(lambda: _clustered(joiner), 240, f"{joiner.name} clustered", interval=0.5)
        rig.add_remote(joiner)
        assert rows[joiner.name]["message"] == "Fully operational"
        assert rows[joiner.name]["roles"] == [] and rows[joiner.name]["database"] is False
        assert sum("database" in r["roles"] for r in rows.values()) == 3
        # Its standalone store was set aside; it runs none now.
        assert not (joiner.state_dir / "etcd").exists()
        assert list(joiner.state_dir.glob("etcd.standalone.*"))
        # It serves the cluster's certificate and is clustered through its own socket.
        assert ssl.get_server_certificate((joiner.address, 8443)).strip() == cert.strip()
        # The token is used up: listed no more, and refused when shown again.
        assert json.loads(rig.lxc(0, "cluster", "list-tokens", "--format", "json").stdout) == []
        status, body = _raw_join(rig, token, joiner.name, "10.77.0.99:8443")
        assert status in (400, 403), body
        assert sorted(member_rows(rig, 0)) == ["m1", "m2", "m3", joiner.name]
        # Its services answer: an instance lands there when targeted.
        rig.lxc(0, "init", "m1:busybox", "m1:c4", "--target", joiner.name)
        assert locations(rig, 0)["c4"] == joiner.name

        # `lxc cluster rename`: refusals as LXD's, then its instance's location follows and
        # it serves under the new name once restarted.
        for old, new, error in (
            (joiner.name, "m1", "The record already exists"),
            (joiner.name, "@x", 'ServerName may not start with "@"'),
            ("m9", "m10", "Cluster member not found"),
        ):
            result = rig.lxc(0, "cluster", "rename", old, new, check=False)
            assert result.returncode != 0 and error in result.stderr, result.stderr
        assert sorted(member_rows(rig, 0)) == ["m1", "m2", "m3", joiner.name]
        rig.lxc(1, "cluster", "rename", joiner.name, "m4x")
        name = "m4x"
        assert locations(rig, 0)["c4"] == name
        wait_until(lambda: _server_name(joiner) == name, 240, f"server name {name}", interval=0.5)
        rows = wait_until(
            lambda: (r := member_rows(rig, 2)) and r[name]["status"] == "Online" and r,
            90, f"{name} online", interval=0.5,
        )  # fmt: skip
        assert sorted(rows) == ["m1", "m2", "m3", name]

        result = rig.lxc(0, "cluster", "remove", name, check=False)
        assert "Node still has the following instances: c4" in result.stderr
        rig.lxc(0, "delete", "m1:c4")  # forwarded to its compute, under its new name
    finally:
        joiner.croft("down", check=False)
    rig.lxc(0, "cluster", "remove", name)
    assert sorted(member_rows(rig, 2)) == ["m1", "m2", "m3"]


# ---------------------------------------------------------------------------- faults


def test_a_killed_member_shows_error_goes_offline_and_comes_back(rig: ClusterRig) -> None:
    """kill -9 of m3's croft processes: m1 keeps answering, m3's instance is ERROR, m3 is
    Offline after the threshold, and back Online with its container still running when
    restarted."""
    rig.lxc(0, "launch", "m1:busybox", "m1:c3", "--target", "m3")
    rig.lxc(0, "config", "set", "cluster.offline_threshold", "11")
    victim = rig.members[2]
    try:
        victim.kill()
        started = time.monotonic()
        rows = {r["name"]: r for r in rig.lxc_json(0, "list")}
        # Reported (pytest -s), not asserted: the target is 2 s.
        print(f"lxc list with m3 dead answered in {time.monotonic() - started:.2f}s")
        assert rows["c3"]["status"] == "Error"
        assert rows["c3"]["location"] == "m3"
        offline = wait_until(
            lambda: member_rows(rig, 0)["m3"]["status"] == "Offline", 60, "m3 offline", interval=0.5
        )
        assert offline
        message = member_rows(rig, 1)["m3"]["message"]
        assert message.startswith("No heartbeat for ")
        # Untargeted launches avoid it; targeting it is refused.
        result = rig.lxc(0, "init", "m1:busybox", "m1:nope", "--target", "m3", check=False)
        assert result.returncode != 0 and "offline" in result.stderr
    finally:
        victim.up()
    wait_until(
        lambda: member_rows(rig, 0)["m3"]["status"] == "Online", 60, "m3 online", interval=0.5
    )
    rows = {r["name"]: r for r in rig.lxc_json(1, "list")}
    assert rows["c3"]["status"] == "Running"
    rig.lxc(0, "config", "unset", "cluster.offline_threshold")
