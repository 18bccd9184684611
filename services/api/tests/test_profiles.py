"""Profiles as a person manages them with `lxc profile ...` and pylxd."""

from __future__ import annotations

import pylxd
import pylxd.exceptions
import pytest
import yaml

from croft.common.store import dump

from .conftest import Replica


def test_default_profile_exists_from_the_start(replica: Replica) -> None:
    shown = yaml.safe_load(replica.lxc("profile", "show", "default").stdout)
    assert shown["description"] == "Default LXD profile"
    assert shown["devices"] == {
        "root": {"type": "disk", "path": "/", "pool": "default"},
        "eth0": {"type": "nic", "name": "eth0", "network": "croftbr0"},
    }


def test_lxc_profile_lifecycle(replica: Replica) -> None:
    replica.lxc("profile", "create", "web")
    assert "web" in replica.lxc("profile", "list", "--format", "csv").stdout

    edited = {
        "description": "web servers",
        "config": {"limits.cpu": "2", "user.role": "web"},
        "devices": {"data": {"type": "disk", "path": "/srv", "source": "/tmp"}},
    }
    replica.lxc("profile", "edit", "web", input=yaml.safe_dump(edited))
    shown = yaml.safe_load(replica.lxc("profile", "show", "web").stdout)
    assert shown["description"] == "web servers"
    assert shown["config"] == {"limits.cpu": "2", "user.role": "web"}
    assert shown["devices"] == edited["devices"]

    replica.lxc("profile", "set", "web", "limits.memory", "512MiB")
    replica.lxc("profile", "unset", "web", "user.role")
    assert yaml.safe_load(replica.lxc("profile", "show", "web").stdout)["config"] == {
        "limits.cpu": "2",
        "limits.memory": "512MiB",
    }

    replica.lxc("profile", "copy", "web", "web2")
    copied = yaml.safe_load(replica.lxc("profile", "show", "web2").stdout)
    assert copied["config"] == {"limits.cpu": "2", "limits.memory": "512MiB"}
    assert copied["devices"] == edited["devices"]

    replica.lxc("profile", "rename", "web2", "web3")
    names = replica.lxc("profile", "list", "--format", "csv").stdout
    assert "web3" in names and "web2" not in names

    replica.lxc("profile", "delete", "web3")
    replica.lxc("profile", "delete", "web")
    assert replica.request("GET", "/1.0/profiles").metadata == ["/1.0/profiles/default"]


def test_lxc_profile_errors(replica: Replica) -> None:
    replica.lxc("profile", "create", "p1")

    duplicate = replica.lxc("profile", "create", "p1", check=False)
    assert duplicate.returncode != 0
    assert 'The profile "p1" already exists' in duplicate.stderr

    missing = replica.lxc("profile", "show", "nope", check=False)
    assert missing.returncode != 0 and "Profile not found" in missing.stderr

    bad_key = replica.lxc("profile", "set", "p1", "foo", "bar", check=False)
    assert bad_key.returncode != 0 and "Unknown configuration key: foo" in bad_key.stderr

    bad_value = replica.lxc("profile", "set", "p1", "limits.cpu", "abc", check=False)
    assert bad_value.returncode != 0 and "Invalid CPU limit syntax" in bad_value.stderr

    default = replica.lxc("profile", "delete", "default", check=False)
    assert default.returncode != 0
    assert 'The "default" profile cannot be deleted' in default.stderr
    # Nothing changed by the refused requests.
    assert yaml.safe_load(replica.lxc("profile", "show", "p1").stdout)["config"] == {}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"name": "p1"}, 409, 'The profile "p1" already exists'),
        ({"name": ""}, 400, "No name provided"),
        ({"name": "bad/name"}, 400, "Profile names may not contain slashes"),
        ({"name": ".."}, 400, 'Invalid profile name ".."'),
        ({"name": "x", "config": {"foo": "bar"}}, 400, "Unknown configuration key: foo"),
        (
            {"name": "x", "config": {"volatile.foo": "bar"}},
            400,
            "Volatile keys can only be set on instances",
        ),
        (
            {"name": "x", "config": {"security.nesting": "maybe"}},
            400,
            'Invalid value for a boolean "maybe"',
        ),
        (
            {"name": "x", "devices": {"x": {"type": "bogus"}}},
            400,
            'Device validation failed for "x": Failed loading device "x": Unsupported device type',
        ),
    ],
)
def test_create_errors(replica: Replica, body: dict, status: int, message: str) -> None:
    replica.request("POST", "/1.0/profiles", {"name": "p1"})
    reply = replica.request("POST", "/1.0/profiles", body)
    assert (reply.status, reply.error) == (status, message)
    names = replica.request("GET", "/1.0/profiles").metadata
    assert sorted(names) == ["/1.0/profiles/default", "/1.0/profiles/p1"]


def test_create_answers_201_with_location(replica: Replica) -> None:
    reply = replica.request("POST", "/1.0/profiles", {"name": "a b", "description": "spaced"})
    assert reply.status == 201
    assert reply.headers["Location"] == "/1.0/profiles/a%20b"
    assert reply.json["metadata"] is None
    assert replica.request("GET", "/1.0/profiles/a%20b").metadata["description"] == "spaced"


def test_etag_guards_put_and_patch(replica: Replica) -> None:
    replica.request("POST", "/1.0/profiles", {"name": "p1", "config": {"limits.cpu": "1"}})
    shown = replica.request("GET", "/1.0/profiles/p1")
    etag = shown.headers["ETag"]
    assert etag.startswith('"') and len(etag) == 66

    stale = replica.request(
        "PUT", "/1.0/profiles/p1", {"config": {}}, headers={"If-Match": '"abc"'}
    )
    assert stale.status == 412
    assert stale.error == f"ETag doesn't match: {etag.strip(chr(34))} vs abc"
    stale = replica.request(
        "PATCH", "/1.0/profiles/p1", {"description": "x"}, headers={"If-Match": "abc"}
    )
    assert stale.status == 412
    assert replica.request("GET", "/1.0/profiles/p1").headers["ETag"] == etag

    ok = replica.request(
        "PATCH", "/1.0/profiles/p1", {"description": "patched"}, headers={"If-Match": etag}
    )
    assert (ok.status, ok.metadata) == (200, {})
    after = replica.request("GET", "/1.0/profiles/p1")
    # PATCH kept what it did not name.
    assert after.metadata["config"] == {"limits.cpu": "1"}
    assert after.metadata["description"] == "patched"
    assert after.headers["ETag"] != etag
    # The old ETag is now stale.
    again = replica.request("PUT", "/1.0/profiles/p1", {}, headers={"If-Match": etag})
    assert again.status == 412

    put = replica.request("PUT", "/1.0/profiles/p1", {"config": {"user.a": "b"}})
    assert put.status == 200
    replaced = replica.request("GET", "/1.0/profiles/p1").metadata
    assert (replaced["config"], replaced["description"], replaced["devices"]) == (
        {"user.a": "b"},
        "",
        {},
    )


def test_rename_rules(replica: Replica) -> None:
    replica.request("POST", "/1.0/profiles", {"name": "p1"})
    reply = replica.request("POST", "/1.0/profiles/default", {"name": "x"})
    assert (reply.status, reply.error) == (403, 'The "default" profile cannot be renamed')
    reply = replica.request("POST", "/1.0/profiles/p1", {"name": "default"})
    assert (reply.status, reply.error) == (409, 'Name "default" already in use')
    reply = replica.request("POST", "/1.0/profiles/nope", {"name": "x"})
    assert reply.status == 404
    reply = replica.request("POST", "/1.0/profiles/p1", {"name": "p2"})
    assert (reply.status, reply.headers["Location"]) == (201, "/1.0/profiles/p2")
    assert replica.request("GET", "/1.0/profiles/p1").status == 404
    assert replica.request("GET", "/1.0/profiles/p2").status == 200


def test_profile_in_use_cannot_be_deleted(replica: Replica) -> None:
    replica.request("POST", "/1.0/profiles", {"name": "web"})
    # An instance record as the compute service writes it (LXD's shape).
    instance = {"name": "c1", "profiles": ["default", "web"], "config": {}, "devices": {}}
    replica.run(replica.ctx.store.put("/croft/records/instances/default/c1", dump(instance)))

    shown = replica.request("GET", "/1.0/profiles/web").metadata
    assert shown["used_by"] == ["/1.0/instances/c1"]
    table = replica.lxc("profile", "list", "--format", "csv").stdout
    assert "web,,1" in table

    reply = replica.request("DELETE", "/1.0/profiles/web")
    assert (reply.status, reply.error) == (400, "Profile is currently in use")
    assert replica.request("GET", "/1.0/profiles/web").status == 200


def add_network(replica: Replica, name: str) -> None:
    """A managed network's record, as the network service writes it (none runs here)."""
    record = {"name": name, "type": "bridge", "managed": True, "config": {}, "description": ""}
    replica.run(replica.ctx.store.create(f"/croft/records/networks/default/{name}", dump(record)))


def test_pylxd_profiles(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LXD_DIR", str(replica.dir))
    add_network(replica, "croftbr0")
    client = pylxd.Client()
    assert client.trusted

    profile = client.profiles.create(
        "py1",
        config={"limits.memory": "1GiB"},
        devices={"eth1": {"type": "nic", "network": "croftbr0", "name": "eth1"}},
    )
    assert profile.name == "py1"
    assert client.profiles.exists("py1")
    assert sorted(p.name for p in client.profiles.all()) == ["default", "py1"]

    profile.description = "from pylxd"
    profile.config["security.nesting"] = "true"
    profile.save()
    fetched = client.profiles.get("py1")
    assert fetched.description == "from pylxd"
    assert fetched.config == {"limits.memory": "1GiB", "security.nesting": "true"}

    fetched.rename("py2")
    assert not client.profiles.exists("py1")
    assert client.profiles.get("py2").devices["eth1"]["network"] == "croftbr0"

    with pytest.raises(pylxd.exceptions.LXDAPIException) as failed:
        client.profiles.create("py2")
    assert failed.value.response.status_code == 409
    with pytest.raises(pylxd.exceptions.NotFound):
        client.profiles.get("nope")
    with pytest.raises(pylxd.exceptions.LXDAPIException) as failed:
        client.profiles.create("bad", config={"nope.key": "1"})
    assert failed.value.response.status_code == 400

    client.profiles.get("py2").delete()
    assert not client.profiles.exists("py2")


def test_a_nic_on_a_network_that_does_not_exist_is_refused(replica: Replica) -> None:
    nic = {"type": "nic", "network": "nosuch", "name": "eth1"}
    reply = replica.request("POST", "/1.0/profiles", {"name": "p", "devices": {"eth1": nic}})
    assert (reply.status, reply.error) == (
        400,
        'Device validation failed for "eth1": Failed loading device "eth1": Failed to load '
        'network "nosuch" for project "default": Network not found',
    )
    assert replica.request("GET", "/1.0/profiles/p").status == 404
    replica.request("POST", "/1.0/profiles", {"name": "p"})
    reply = replica.request("PATCH", "/1.0/profiles/p", {"devices": {"eth1": nic}})
    assert reply.status == 400, reply
    assert replica.request("GET", "/1.0/profiles/p").metadata["devices"] == {}
    # the default profile's NIC names a network no network service made here: a profile
    # keeps what it had, and only what changes is checked
    reply = replica.request("PATCH", "/1.0/profiles/default", {"description": "changed"})
    assert reply.status == 200, reply
