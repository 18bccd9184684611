"""Projects (issue 20), with the real `lxc` 5.0.2 client against an isolated croft:
create, show, change, rename and delete them, `--project` on instances, profiles, images
and aliases, what a project shares with `default` (features), limits and restrictions,
each refusal in LXD 5.0.2's words (measured against it)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Croft, Lxc

LXC = tuple[Croft, Lxc, str]


def project(lxc: Lxc, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(lxc("project", "show", name).stdout)
    return loaded


@pytest.fixture(scope="module")
def two_projects(croft_lxc: LXC, busybox_image: Path) -> Iterator[tuple[str, str]]:
    """Projects `pa` and `pb`, each with its own busybox image (alias `busybox`), a root
    disk in its default profile, an instance `c` and a profile `web`."""
    _, lxc, _ = croft_lxc
    for name in ("pa", "pb"):
        lxc("project", "create", name)
        lxc("image", "import", str(busybox_image), "--alias", "busybox", "--project", name)
        lxc("profile", "device", "add", "default", "root", "disk", "path=/", "pool=default",
            "--project", name)  # fmt: skip
        lxc("profile", "create", "web", "--project", name)
        lxc("init", "busybox", "c", "--project", name)
    yield "pa", "pb"


def test_a_new_project_is_lxds(croft_lxc: LXC) -> None:
    _, lxc, _ = croft_lxc
    assert lxc("project", "create", "fresh").stdout.strip() == "Project fresh created"
    shown = project(lxc, "fresh")
    assert shown == {
        "config": {
            "features.images": "true",
            "features.profiles": "true",
            "features.storage.volumes": "true",
        },
        "description": "",
        "name": "fresh",
        "used_by": ["/1.0/profiles/default?project=fresh"],
    }
    # Its own default profile, as LXD makes it: no devices.
    profile = yaml.safe_load(lxc("profile", "show", "default", "--project", "fresh").stdout)
    assert profile["devices"] == {} and profile["config"] == {}
    assert profile["description"] == "Default LXD profile for project fresh"
    assert "fresh" in lxc.names("project", "list")
    assert lxc.refused("project", "create", "fresh") == (
        'Failed creating project "fresh": Failed adding database record: '
        'This "projects" entry already exists'
    )
    assert lxc.refused("project", "create", "a/b") == "Project names may not contain slashes"
    assert lxc.refused("project", "create", "a b") == "Project names may not contain spaces"
    assert lxc.refused("project", "create", "*") == "Reserved project name"
    assert lxc.refused("project", "create", "bad", "-c", "bogus=1") == (
        'Invalid project configuration key "bogus"'
    )
    assert lxc.refused("project", "set", "fresh", "limits.instances", "abc") == (
        'Invalid project configuration key "limits.instances" value: Invalid value for uint32 '
        '"abc": strconv.ParseUint: parsing "abc": invalid syntax'
    )
    assert "bad" not in lxc.names("project", "list")

    lxc("project", "set", "fresh", "user.owner", "alice")
    assert lxc("project", "get", "fresh", "user.owner").stdout.strip() == "alice"
    lxc("project", "unset", "fresh", "user.owner")
    assert "user.owner" not in project(lxc, "fresh")["config"]
    edited = yaml.safe_dump({**project(lxc, "fresh"), "description": "edited"})
    lxc("project", "edit", "fresh", input=edited)
    assert project(lxc, "fresh")["description"] == "edited"

    # An empty project renames and deletes, its default profile with it.
    lxc("project", "rename", "fresh", "fresher")
    assert "fresh" not in lxc.names("project", "list")
    assert project(lxc, "fresher")["used_by"] == ["/1.0/profiles/default?project=fresher"]
    lxc("project", "delete", "fresher")
    assert "fresher" not in lxc.names("project", "list")
    assert lxc.refused("project", "show", "fresher") == "Project not found"


def test_default_cannot_go_or_change_features(croft_lxc: LXC) -> None:
    _, lxc, _ = croft_lxc
    assert lxc.refused("project", "delete", "default") == (
        "The 'default' project cannot be deleted"
    )
    assert lxc.refused("project", "rename", "default", "x") == (
        "The 'default' project cannot be renamed"
    )
    assert lxc.refused("project", "set", "default", "features.images", "false") == (
        "You can't change the features of the default project"
    )


def test_two_projects_hold_the_same_names(croft_lxc: LXC, two_projects: tuple[str, str]) -> None:
    _, lxc, _ = croft_lxc
    for name in two_projects:
        assert lxc.names("list", "--project", name) == ["c"]
        assert "web" in lxc.names("profile", "list", "--project", name)
        aliases = lxc.json("image", "alias", "list", "--project", name)
        assert [a["name"] for a in aliases] == ["busybox"]
        used = project(lxc, name)["used_by"]
        assert f"/1.0/instances/c?project={name}" in used
    assert "c" not in lxc.names("list")
    assert "web" not in lxc.names("profile", "list")
    # The instances are two, each in its own project, on the host too.
    first = lxc.json("list", "--project", "pa")[0]
    assert first["project"] == "pa"
    # Switching the client's project changes what plain commands see.
    lxc("project", "switch", "pb")
    try:
        assert lxc.names("list") == ["c"]
        assert "pb (current)" in lxc("project", "list").stdout
    finally:
        lxc("project", "switch", "default")


def test_a_project_in_use_cannot_go(croft_lxc: LXC, two_projects: tuple[str, str]) -> None:
    _, lxc, _ = croft_lxc
    assert lxc.refused("project", "delete", "pa") == "Only empty projects can be removed"
    assert lxc.refused("project", "rename", "pa", "pz") == "Only empty projects can be renamed"
    assert lxc.refused("project", "set", "pa", "features.profiles", "false") == (
        'Project feature "features.profiles" cannot be disabled on non-empty projects'
    )
    assert "pa" in lxc.names("project", "list")


def test_a_project_without_features_shares_defaults(croft_lxc: LXC, busybox_image: Path) -> None:
    """`features.images=false` and `features.profiles=false`: default's images and
    profiles are the project's, and an instance launches from them."""
    croft, lxc, bridge = croft_lxc
    if "busybox" not in [a["name"] for a in lxc.json("image", "alias", "list")]:
        lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("project", "create", "shared", "-c", "features.images=false",
        "-c", "features.profiles=false")  # fmt: skip
    assert project(lxc, "shared")["used_by"] == []
    aliases = [a["name"] for a in lxc.json("image", "alias", "list", "--project", "shared")]
    assert "busybox" in aliases
    assert lxc.names("profile", "list", "--project", "shared") == lxc.names("profile", "list")
    lxc("launch", "busybox", "s1", "--project", "shared")
    try:
        state = lxc.json("list", "--project", "shared")[0]
        assert state["status"] == "Running"
        assert "eth0" in state["expanded_devices"]  # from default's default profile
        # Its DHCP host entry is named as LXD names it outside default: <name>.<project>.
        hosts = croft.root / "state" / "networks" / bridge / "dnsmasq.hosts.d"
        assert any(h.read_text().strip().endswith(",s1.shared") for h in hosts.iterdir())
        assert lxc.names("list", "--project", "shared") == ["s1"]
        assert "s1" not in lxc.names("list")
        # default's profile knows who uses it, in every project that shares it.
        used = yaml.safe_load(lxc("profile", "show", "default").stdout)["used_by"]
        assert "/1.0/instances/s1?project=shared" in used
        assert lxc.refused("profile", "delete", "default") != ""
    finally:
        lxc("delete", "--force", "s1", "--project", "shared")
    lxc("project", "delete", "shared")


def test_limits_refuse_with_lxds_messages(croft_lxc: LXC, two_projects: tuple[str, str]) -> None:
    _, lxc, _ = croft_lxc
    p = ("--project", "pb")
    lxc("project", "set", "pb", "limits.instances", "2")
    lxc("init", "busybox", "c2", *p)
    try:
        assert lxc.refused("init", "busybox", "c3", *p) == (
            'Reached maximum number of instances in project "pb"'
        )
        assert "c3" not in lxc.names("list", *p)
        # A copy is a create: held to the same limit.
        assert lxc.refused("copy", "c", "c3", *p) == (
            'Reached maximum number of instances in project "pb"'
        )
        assert "c3" not in lxc.names("list", *p)
        assert lxc.refused("project", "set", "pb", "limits.instances", "1") == (
            'Can\'t change limits.instances in project "pb": "limits.instances" is too low: '
            'there currently are 2 total instances in project "pb"'
        )
        lxc("project", "unset", "pb", "limits.instances")
        lxc("project", "set", "pb", "limits.containers", "2")
        assert lxc.refused("init", "busybox", "c3", *p) == (
            'Reached maximum number of instances of type "container" in project "pb"'
        )
        lxc("project", "unset", "pb", "limits.containers")

        # An aggregate limit needs every instance to say its share.
        assert lxc.refused("project", "set", "pb", "limits.cpu", "2") == (
            'Instance "c" in project "pb" has no "limits.cpu" config, either directly or '
            "via a profile"
        )
        lxc("profile", "set", "default", "limits.cpu", "1", *p)
        lxc("project", "set", "pb", "limits.cpu", "2")
        assert lxc.refused("init", "busybox", "c3", *p) == (
            'Failed checking if instance creation allowed: Reached maximum aggregate value "2" '
            'for "limits.cpu" in project "pb"'
        )
        assert lxc.refused("config", "set", "c", "limits.cpu", "2", *p) == (
            'Failed checking if instance update allowed: Reached maximum aggregate value "2" '
            'for "limits.cpu" in project "pb"'
        )
        assert lxc("config", "get", "c", "limits.cpu", *p).stdout.strip() == ""
        # A profile change counts in every instance that uses the profile.
        assert lxc.refused("profile", "set", "default", "limits.cpu", "2", *p) == (
            'Failed checking if profile update allowed: Reached maximum aggregate value "2" '
            'for "limits.cpu" in project "pb"'
        )
        assert lxc("profile", "get", "default", "limits.cpu", *p).stdout.strip() == "1"
        info = lxc("project", "info", "pb").stdout
        assert "| CPU              | 2         | 2     |" in info
        assert "| INSTANCES        | UNLIMITED | 2     |" in info
    finally:
        lxc("project", "unset", "pb", "limits.cpu")
        lxc("profile", "unset", "default", "limits.cpu", *p)
        lxc("delete", "c2", *p)


def test_restrictions_refuse_with_lxds_messages(
    croft_lxc: LXC, two_projects: tuple[str, str]
) -> None:
    _, lxc, _ = croft_lxc
    p = ("--project", "pa")
    lxc("project", "set", "pa", "restricted", "true")
    try:
        assert lxc.refused("init", "busybox", "c3", "-c", "security.privileged=true", *p) == (
            'Failed checking if instance creation allowed: Invalid value "true" for config '
            '"security.privileged" on container "c3" of project "pa": Privileged containers '
            "are forbidden"
        )
        assert lxc.refused("init", "busybox", "c3", "-c", "security.nesting=true", *p) == (
            'Failed checking if instance creation allowed: Invalid value "true" for config '
            '"security.nesting" on container "c3" of project "pa": Container nesting is '
            "forbidden"
        )
        assert "c3" not in lxc.names("list", *p)
        assert lxc.refused(
            "config", "device", "add", "c", "d", "disk", "source=/tmp", "path=/mnt", *p
        ) == (
            'Failed checking if instance update allowed: Invalid device "d" on container "c" '
            'of project "pa": Attaching disks not backed by a pool is forbidden'
        )
        assert lxc.refused("config", "set", "c", "raw.lxc", "lxc.aa=1", *p) == (
            'Failed checking if instance update allowed: Use of low-level config "raw.lxc" on '
            'container "c" of project "pa" is forbidden'
        )
        assert "d" not in lxc.json("list", *p)[0]["devices"]
        assert lxc.refused("snapshot", "c", *p) == (
            'Project "pa" doesn\'t allow for snapshot creation'
        )
        assert lxc.refused("profile", "set", "web", "security.privileged", "true", *p) == (
            'Failed checking if profile update allowed: Invalid value "true" for config '
            '"security.privileged" on  "web" of project "pa": Privileged containers are '
            "forbidden"
        )
        # A profile in use is checked as the instances that use it would be.
        assert lxc.refused("profile", "set", "default", "security.privileged", "true", *p) == (
            'Failed checking if profile update allowed: Invalid value "true" for config '
            '"security.privileged" on container "c" of project "pa": Privileged containers are '
            "forbidden"
        )
        # Allowed explicitly, a privileged container is fine; taking it back is a conflict.
        lxc("project", "set", "pa", "restricted.containers.privilege", "allow")
        lxc("config", "set", "c", "security.privileged", "true", *p)
        assert lxc.refused(
            "project", "set", "pa", "restricted.containers.privilege", "unprivileged"
        ) == (
            'Conflict detected when changing "restricted.containers.privilege" in project '
            '"pa": Invalid value "true" for config "security.privileged" on container "c" of '
            'project "pa": Privileged containers are forbidden'
        )
        lxc("config", "unset", "c", "security.privileged", *p)
        # The cluster keys are accepted, for when the cluster comes.
        lxc("project", "set", "pa", "restricted.cluster.groups", "g1")
        lxc("project", "set", "pa", "restricted.cluster.target", "allow")
    finally:
        lxc("project", "unset", "pa", "restricted")


def test_project_state_counts_what_it_holds(croft_lxc: LXC, two_projects: tuple[str, str]) -> None:
    _, lxc, _ = croft_lxc
    state = json.loads(lxc("query", "/1.0/projects/pa/state").stdout)
    assert state["resources"]["instances"] == {"Limit": -1, "Usage": 1}
    assert state["resources"]["containers"] == {"Limit": -1, "Usage": 1}


def test_a_restricted_client_keeps_to_its_project(
    croft_lxc: LXC, two_projects: tuple[str, str], busybox_image: Path
) -> None:
    """`lxc config trust add --restricted --projects pa`: the remote user sees and changes
    pa only, by every path the client has, and nothing server-wide."""
    croft, lxc, _ = croft_lxc
    from .conftest import free_port

    lxc("config", "set", "core.https_address", f"127.0.0.1:{free_port()}")
    token = lxc("config", "trust", "add", "--name", "tenant", "--restricted", "--projects", "pa",
                "-q").stdout.strip()  # fmt: skip
    tenant = Lxc(croft.root / "no-socket", croft.root / "tenant-home")
    tenant.home.mkdir(exist_ok=True)
    tenant("remote", "add", "croft", token)
    tenant("remote", "switch", "croft")
    tenant("project", "switch", "pa")
    try:
        assert tenant.names("list") == ["c"]
        assert tenant.names("project", "list") == ["pa"]
        tenant("init", "busybox", "mine")
        assert tenant.names("list") == ["c", "mine"]
        tenant("delete", "mine")
        for args in (
            ("list", "--project", "pb"),
            ("query", "/1.0/instances?all-projects=true&project=pa"),
            ("project", "show", "pb"),
            ("init", "busybox", "x", "--project", "pb"),
            ("delete", "c", "--project", "pb"),
            ("profile", "create", "p", "--project", "pb"),
            ("project", "create", "mine"),
            ("project", "set", "pa", "limits.instances", "50"),
            ("config", "set", "user.x", "1"),
            ("storage", "create", "p2", "dir"),
        ):
            result = tenant(*args, check=False)
            assert result.returncode != 0, args
            assert "not authorized" in result.stderr, (args, result.stderr)
        # Of the trust store, it sees its own certificate only.
        assert [c["name"] for c in tenant.json("config", "trust", "list")] == ["tenant"]

        # `lxc config trust edit` widens it to pb, at once.
        (mine,) = [c for c in lxc.json("config", "trust", "list") if c["name"] == "tenant"]
        edited = yaml.safe_dump({**mine, "projects": ["pa", "pb"]})
        lxc("config", "trust", "edit", mine["fingerprint"], input=edited)
        assert tenant.names("list", "--project", "pb") == ["c"]
        assert tenant.names("project", "list") == ["pa", "pb"]
        other = croft.root / "other.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-nodes", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:P-384", "-days", "30", "-keyout", str(croft.root / "other.key"),
             "-out", str(other), "-subj", "/CN=other"],
            check=True, capture_output=True,
        )  # fmt: skip
        lxc("config", "trust", "add", str(other), "--restricted", "--projects", "pb")
        assert len(lxc.json("config", "trust", "list")) == 2
        assert [c["name"] for c in tenant.json("config", "trust", "list")] == ["tenant"]

        assert lxc.names("list", "--project", "pb") == ["c"]
        assert "limits.instances" not in project(lxc, "pa")["config"]
    finally:
        lxc("config", "unset", "core.https_address")


def test_networks_and_volumes_are_held_to_the_project(croft_lxc: LXC) -> None:
    """`restricted.networks.access`, `limits.networks` and `limits.disk` refuse a network
    or a custom volume in LXD 5.0.2's words (measured against it), and nothing is made."""
    _, lxc, _ = croft_lxc
    lxc("project", "create", "pnet", "-c", "features.networks=true", "-c", "limits.networks=0")
    lxc("project", "create", "prnet", "-c", "restricted=true",
        "-c", "restricted.networks.access=none")  # fmt: skip
    lxc("project", "create", "pvol", "-c", "limits.disk=10MiB")
    p = ("--project", "pvol")
    try:
        assert lxc.refused("network", "create", "pn0", "--project", "pnet") == (
            "Networks limit has been reached for project"
        )
        assert lxc.refused("network", "create", "pn1", "--project", "prnet") == (
            "Network not allowed in project"
        )
        assert not {"pn0", "pn1"} & set(lxc.names("network", "list"))

        assert lxc.refused("storage", "volume", "create", "default", "v", *p) == (
            "Failed checking if volume creation allowed: Failed getting usage of project "
            'entities: Custom volume "v" in project "pvol" has no "size" config set'
        )
        assert lxc.refused("storage", "volume", "create", "default", "v", "size=20MiB", *p) == (
            'Failed checking if volume creation allowed: Reached maximum aggregate value "10MiB" '
            'for "limits.disk" in project "pvol"'
        )
        assert lxc.names("storage", "volume", "list", "default", "type=custom", *p) == []
        lxc("storage", "volume", "create", "default", "v", "size=5MiB", *p)
        assert lxc.refused("storage", "volume", "set", "default", "v", "size=50MiB", *p) == (
            'Failed checking if volume update allowed: Reached maximum aggregate value "10MiB" '
            'for "limits.disk" in project "pvol"'
        )
        assert lxc("storage", "volume", "get", "default", "v", "size", *p).stdout.strip() == "5MiB"
        assert (
            "/1.0/storage-pools/default/volumes/custom/v?project=pvol"
            in (project(lxc, "pvol")["used_by"])
        )
        lxc("storage", "volume", "delete", "default", "v", *p)
    finally:
        for name in ("pnet", "prnet", "pvol"):
            lxc("project", "delete", name, check=False)


def test_a_project_without_its_own_volumes_uses_defaults(
    croft_lxc: LXC, busybox_image: Path
) -> None:
    """`features.storage.volumes=false`: the project's custom volumes are default's, and
    its instances attach them."""
    _, lxc, _ = croft_lxc
    if "busybox" not in [a["name"] for a in lxc.json("image", "alias", "list")]:
        lxc("image", "import", str(busybox_image), "--alias", "busybox")
    p = ("--project", "pshv")
    lxc("project", "create", "pshv", "-c", "features.storage.volumes=false",
        "-c", "features.images=false", "-c", "features.profiles=false")  # fmt: skip
    try:
        lxc("storage", "volume", "create", "default", "shv", *p)
        assert "shv" in lxc.names("storage", "volume", "list", "default", "type=custom")
        lxc("init", "busybox", "shc", *p)
        lxc("storage", "volume", "attach", "default", "shv", "shc", "/mnt", *p)
        lxc("start", "shc", *p)
        lxc("exec", "shc", *p, "--", "touch", "/mnt/seen")
        shown = yaml.safe_load(lxc("storage", "volume", "show", "default", "shv").stdout)
        assert shown["used_by"] == ["/1.0/instances/shc?project=pshv"]
        lxc("delete", "--force", "shc", *p)
        lxc("storage", "volume", "delete", "default", "shv", *p)
        assert "shv" not in lxc.names("storage", "volume", "list", "default", "type=custom")
    finally:
        lxc("delete", "--force", "shc", *p, check=False)
        lxc("storage", "volume", "delete", "default", "shv", check=False)
        lxc("project", "delete", "pshv", check=False)
