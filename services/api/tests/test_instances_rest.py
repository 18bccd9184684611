"""Instance requests that croft refuses at the edge, with LXD 5.0.2's status and words.

Each message here was measured against a real LXD 5.0.2. Where LXD answers a client's
mistake with a 500 or a failed operation, croft answers at once with a 400/404/409 and
LXD's message. These refusals happen before the api calls any other service, so the
tests run the api alone (no compute, no images service): a request that got past the
checks would reach a service that is not there. Every test also checks that a refused
request left nothing behind: no instance record, no operation, no changed record.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from croft.common.store import dump

from .conftest import Replica

IMAGE = {"type": "image", "alias": "busybox"}
EMPTY = {"type": "none"}


def seed_instance(replica: Replica, name: str = "c1", **fields: Any) -> dict[str, Any]:
    """An instance record as the compute service writes it (LXD's shape + `_croft`)."""
    record = {
        "name": name,
        "project": "default",
        "description": "",
        "architecture": "x86_64",
        "config": {"volatile.uuid": "8c3c4b0e-0a39-4f59-b0c4-3a9c0e2f1d11"},
        "devices": {},
        "profiles": ["default"],
        "ephemeral": False,
        "stateful": False,
        "expanded_config": {"volatile.uuid": "8c3c4b0e-0a39-4f59-b0c4-3a9c0e2f1d11"},
        "expanded_devices": {
            "root": {"type": "disk", "path": "/", "pool": "default"},
            "eth0": {"type": "nic", "name": "eth0", "network": "croftbr0"},
        },
        "type": "container",
        "created_at": "2026-11-22T14:38:56.06438353Z",
        "last_used_at": "0001-01-01T00:00:00Z",
        "location": "none",
        "status": "Stopped",
        "status_code": 102,
        "_croft": {"member": "m1", "pool": "default"},
        **fields,
    }
    replica.run(replica.ctx.store.put(f"/croft/records/instances/default/{name}", dump(record)))
    return record


def seed_snapshot(replica: Replica, instance: str, name: str) -> None:
    snap = {"name": name, "created_at": "2026-11-22T14:40:00Z", "stateful": False}
    key = f"/croft/records/instance-snapshots/default/{instance}/{name}"
    replica.run(replica.ctx.store.put(key, dump(snap)))


def stored(replica: Replica) -> dict[str, bytes]:
    """Every record and operation in the store, to compare before and after a request."""

    async def read() -> dict[str, bytes]:
        store = replica.ctx.store
        entries = await store.list("/croft/records/") + await store.list("/croft/operations/")
        return {e.key: e.value for e in entries}

    return replica.run(read())


def refused(replica: Replica, method: str, path: str, body: Any, status: int, message: str) -> None:
    """The request is answered `status` with exactly LXD's `message`, changing nothing."""
    before = stored(replica)
    reply = replica.request(method, path, body)
    assert (reply.status, reply.error) == (status, message), reply
    assert reply.json["type"] == "error" and reply.json["error_code"] == status
    after = stored(replica)
    assert after == before
    assert not [k for k in after if k.startswith("/croft/operations/")]


# ---------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("1abc", "Name must not start with a number"),
        ("a_b", "Name can only contain alphanumeric and hyphen characters"),
        ("a.b", "Name can only contain alphanumeric and hyphen characters"),
        ("-x", 'Name must not start with "-" character'),
        ("-a_", 'Name must not start with "-" character'),
        ("a-", 'Name must not end with "-" character'),
        ("1a-_", "Name must not start with a number"),
        ("1_a", "Name must not start with a number"),
        ("1-", 'Name must not end with "-" character'),
        ("a" * 64, "Name must be 1-63 characters long"),
    ],
)
def test_invalid_instance_names(replica: Replica, name: str, message: str) -> None:
    body = {"name": name, "source": IMAGE}
    refused(replica, "POST", "/1.0/instances", body, 400, f"Invalid instance name: {message}")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"foo.bar": "x"}, "Unknown configuration key: foo.bar"),
        ({"volatile.foo": "x"}, "Unknown configuration key: volatile.foo"),
        ({"limits.memory": "lots"}, "Invalid value: lots"),
        ({"limits.memory": "1.5GB"}, "Invalid value: 1.5GB"),
        ({"limits.memory": "0"}, "Memory limit can't be 0"),
        ({"limits.memory": "abc%"}, 'strconv.ParseInt: parsing "abc": invalid syntax'),
        ({"limits.cpu": "abc"}, "Invalid CPU limit syntax"),
        ({"limits.cpu.priority": "11"}, 'Invalid value for a limit "11". Must be between 0 and 10'),
        ({"limits.cpu.allowance": "abc"}, "Invalid allowance: abc"),
        ({"limits.memory.enforce": "x"}, 'Invalid value "x" (not one of [soft hard])'),
        ({"limits.processes": "x"}, 'Invalid value for an integer "x"'),
        ({"security.privileged": "maybe"}, 'Invalid value for a boolean "maybe"'),
    ],
)
def test_bad_config_is_refused(replica: Replica, config: dict[str, str], message: str) -> None:
    # LXD: 202, then the operation fails with this message.
    body = {"name": "c1", "source": IMAGE, "config": config}
    refused(
        replica, "POST", "/1.0/instances", body, 400, f"Failed creating instance record: {message}"
    )


INIT = "Failed creating instance record: Failed initialising instance: "


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        # LXD: 500 for the missing profile, a failed operation for the others.
        ({"profiles": ["default", "nope"]}, 404, 'Requested profile "nope" doesn\'t exist'),
        ({"profiles": [""]}, 404, 'Requested profile "" doesn\'t exist'),
        (
            {"profiles": ["default", "default"]},
            400,
            "Failed creating instance record: Duplicate profile found in request",
        ),
        (
            {"devices": {"eth1": {"type": "nic"}}},
            400,
            INIT + 'Invalid devices: Device validation failed for "eth1": '
            'Failed loading device "eth1": Unsupported device type',
        ),
        (
            {"devices": {"x": {"path": "/x"}}},
            400,
            "Failed creating instance record: Invalid device type ",
        ),
        (
            {"devices": {"x": {"type": "bogus"}}},
            400,
            "Failed creating instance record: Invalid device type bogus",
        ),
        (
            {"devices": {"d": {"type": "disk", "path": "/mnt"}}},
            400,
            INIT + 'Invalid devices: Device validation failed for "d": '
            'Disk entry is missing the required "source" or "path" property',
        ),
        (
            {"devices": {"r2": {"type": "disk", "path": "/", "pool": "default"}}},
            400,
            INIT + "Invalid devices: Failed detecting root disk device: More than one root "
            "device found",
        ),
        (
            {"profiles": []},
            400,
            INIT + "Failed getting root disk: No root device could be found",
        ),
    ],
)
def test_bad_profiles_and_devices_are_refused(
    replica: Replica, extra: dict[str, Any], status: int, message: str
) -> None:
    body = {"name": "c1", "source": IMAGE, **extra}
    refused(replica, "POST", "/1.0/instances", body, status, message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # (A type no compute service runs is refused from what the computes register:
        # tests/test_instance_types.py, against a real compute service.)
        ({"type": "bogus"}, "Invalid instance type"),
        ({"source": {"type": "bogus"}}, "Unknown source type bogus"),
        ({"source": None}, "Unknown source type "),
        # LXD: 500.
        (
            {"source": {"type": "image"}},
            "Must specify one of alias, fingerprint or properties for init from image",
        ),
        ({"source": {"type": "copy"}}, "Must specify a source instance"),
        (
            {"source": {"type": "migration"}},
            'Creating instances by "migration" is not supported yet',
        ),
    ],
)
def test_bad_type_or_source_is_refused(
    replica: Replica, extra: dict[str, Any], message: str
) -> None:
    body = {"name": "c1", "source": IMAGE, **extra}
    if body["source"] is None:
        del body["source"]
    refused(replica, "POST", "/1.0/instances", body, 400, message)


def test_a_copy_of_what_does_not_exist_is_404(replica: Replica) -> None:
    body = {"name": "c1", "source": {"type": "copy", "source": "c0"}}
    refused(replica, "POST", "/1.0/instances", body, 404,
            'Failed to fetch instance "c0" in project "default": Instance not found')  # fmt: skip
    seed_instance(replica, "c0")
    body = {"name": "c1", "source": {"type": "copy", "source": "c0/snap9"}}
    refused(replica, "POST", "/1.0/instances", body, 404,
            'Failed to fetch snapshot "snap9" of instance "c0" in project "default": '
            "InstanceSnapshot not found")  # fmt: skip
    assert not [k for k in stored(replica) if "/instances/c1" in k]


def test_duplicate_name_is_409_at_once(replica: Replica) -> None:
    # LXD: 202, then 'Failed creating instance record: Add instance info to the database:
    # This "instances" entry already exists'. The same words as compute's atomic create.
    seed_instance(replica, "c1")
    body = {"name": "c1", "source": IMAGE}
    refused(replica, "POST", "/1.0/instances", body, 409, 'Instance "c1" already exists')
    refused(replica, "POST", "/1.0/containers", body, 409, 'Instance "c1" already exists')


def test_a_record_still_being_created_is_a_duplicate_too(replica: Replica) -> None:
    seed_instance(replica, "c1", _croft={"member": "m1", "state": "creating"})
    body = {"name": "c1", "source": EMPTY}
    refused(replica, "POST", "/1.0/instances", body, 409, 'Instance "c1" already exists')


def test_malformed_bodies(replica: Replica) -> None:
    refused(replica, "POST", "/1.0/instances", [1], 400,
            "The request body must be a JSON object (InstancesPost), not list")  # fmt: skip
    reply = replica.request("POST", "/1.0/instances", {"name": 5, "source": IMAGE})
    assert reply.status == 400 and "'name'" in reply.error
    assert not [k for k in stored(replica) if "/instances/" in k]


# ---------------------------------------------------------------------------- one instance


def test_missing_instance_is_404_everywhere(replica: Replica) -> None:
    for method, path, body in [
        ("GET", "/1.0/instances/nope", None),
        ("GET", "/1.0/instances/nope?recursion=1", None),
        ("PUT", "/1.0/instances/nope", {"config": {}}),
        ("PATCH", "/1.0/instances/nope", {"config": {}}),
        ("DELETE", "/1.0/instances/nope", None),
        ("GET", "/1.0/instances/nope/state", None),
        ("PUT", "/1.0/instances/nope/state", {"action": "start"}),
        ("POST", "/1.0/instances/nope/exec", {"command": ["true"]}),
        ("GET", "/1.0/instances/nope/files?path=/etc/hostname", None),
        ("GET", "/1.0/instances/nope/snapshots", None),
        ("POST", "/1.0/instances/nope/snapshots", {"name": "s1"}),
        ("GET", "/1.0/instances/nope/snapshots/s1", None),
    ]:
        refused(replica, method, path, body, 404, "Instance not found")


def test_missing_snapshot_is_404(replica: Replica) -> None:
    seed_instance(replica, "c1")
    message = (
        'Failed to fetch snapshot "nosnap" of instance "c1" in project "default": '
        "InstanceSnapshot not found"
    )
    refused(replica, "GET", "/1.0/instances/c1/snapshots/nosnap", None, 404, message)
    refused(replica, "DELETE", "/1.0/instances/c1/snapshots/nosnap", None, 404, message)
    refused(replica, "POST", "/1.0/instances/c1/snapshots/nosnap", {"name": "x"}, 404, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "dance"}, "Unknown action: 'dance'"),
        ({}, "Unknown action: ''"),
        ({"action": "stop", "stateful": True}, "Stateful stop and start are not supported"),
    ],
)
def test_bad_state_change_is_refused(replica: Replica, body: dict[str, Any], message: str) -> None:
    seed_instance(replica, "c1")
    refused(replica, "PUT", "/1.0/instances/c1/state", body, 400, message)


def test_exec_without_a_command_is_refused(replica: Replica) -> None:
    # LXD: 202, then "Failed to retrieve PID of executing child process".
    seed_instance(replica, "c1")
    refused(replica, "POST", "/1.0/instances/c1/exec", {"command": []}, 400, "No command given")
    refused(replica, "POST", "/1.0/instances/c1/exec", {"wait-for-websocket": True}, 400,
            "No command given")  # fmt: skip


def test_file_requests_need_a_path(replica: Replica) -> None:
    seed_instance(replica, "c1")
    for method in ("GET", "DELETE"):
        refused(replica, method, "/1.0/instances/c1/files", None, 400, "Missing path argument")
    before = stored(replica)
    for headers, message in [
        ({}, "Missing path argument"),
        ({"X-LXD-type": "bogus"}, "Bad file type: bogus"),
        ({"X-LXD-write": "bogus"}, "Bad file write mode: bogus"),
    ]:
        path = "/1.0/instances/c1/files" + ("?path=/tmp/x" if headers else "")
        reply = replica.request("POST", path, raw=b"hello", headers=headers)
        assert (reply.status, reply.error) == (400, message)
    assert stored(replica) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "a/b"}, 'Invalid snapshot name: Cannot contain "/"'),
        # LXD accepts these two, and its dir backend then overwrites the snapshots'
        # directories (measured): croft refuses them.
        ({"name": "."}, 'Invalid snapshot name: Cannot be "."'),
        ({"name": ".."}, 'Invalid snapshot name: Cannot be ".."'),
        # LXD: a failed operation with this reason.
        ({"name": "a b"}, "Invalid instance snapshot name: Cannot contain space or / characters"),
        (
            {"name": "e1", "expires_at": "tomorrow"},
            'Invalid expires_at "tomorrow": not an RFC 3339 time (e.g. 2030-01-31T12:00:00Z)',
        ),
    ],
)
def test_bad_snapshot_names_are_refused(
    replica: Replica, body: dict[str, Any], message: str
) -> None:
    seed_instance(replica, "c1")
    refused(replica, "POST", "/1.0/instances/c1/snapshots", body, 400, message)


def test_snapshot_rename_refusals(replica: Replica) -> None:
    seed_instance(replica, "c1")
    seed_snapshot(replica, "c1", "s1")
    seed_snapshot(replica, "c1", "s2")
    url = "/1.0/instances/c1/snapshots/s1"
    refused(replica, "POST", url, {"name": "x/y"}, 400, 'Invalid snapshot name: Cannot contain "/"')
    refused(replica, "POST", url, {"name": "s2"}, 409, "Name 'c1/s2' already in use")
    refused(replica, "POST", url, {"name": ""}, 400, "Invalid snapshot name: Cannot be empty")


def test_restore_of_a_missing_snapshot_is_404(replica: Replica) -> None:
    # LXD: 202, then the operation fails with these words.
    seed_instance(replica, "c1")
    seed_instance(replica, "c2")
    seed_snapshot(replica, "c2", "s1")
    for restore, message in [
        ("nosnap", "Snapshot c1/nosnap does not exist"),
        ("c1/nosnap", "Snapshot c1/nosnap does not exist"),
        ("c2/s1", "Snapshot c2/s1 does not exist"),
        ("c1/a/b", "Snapshot c1/a/b does not exist"),
    ]:
        refused(replica, "PUT", "/1.0/instances/c1", {"restore": restore}, 404, message)


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"config": {"foo.bar": "x"}}, 400, "Invalid config: Unknown configuration key: foo.bar"),
        ({"config": {"limits.cpu": "abc"}}, 400, "Invalid config: Invalid CPU limit syntax"),
        (
            {"config": {"security.privileged": "maybe"}},
            400,
            'Invalid config: Invalid value for a boolean "maybe"',
        ),
        ({"profiles": ["nope"]}, 404, "Profile not found"),
        ({"profiles": ["default", "default"]}, 400, "Duplicate profile found in request"),
        (
            {"devices": {"eth9": {"type": "nic"}}},
            400,
            'Invalid devices: Device validation failed for "eth9": '
            'Failed loading device "eth9": Unsupported device type',
        ),
        (
            {"devices": {"x": {"path": "/x"}}},
            400,
            'Invalid devices: Device validation failed for "x": '
            'Failed loading device "x": Missing device type in config',
        ),
    ],
)
def test_bad_update_is_refused(
    replica: Replica, method: str, body: dict[str, Any], status: int, message: str
) -> None:
    # LXD: a 500 for PATCH (404 for the profile), a failed operation for PUT.
    seed_instance(replica, "c1")
    if method == "PUT":
        body = {"profiles": ["default"], **body}
    refused(replica, method, "/1.0/instances/c1", body, status, message)


# ---------------------------------------------------------------------------- lxc client


def test_lxc_shows_the_refusals_as_lxd_does(replica: Replica) -> None:
    """The real `lxc` client, and what it prints: LXD's lines (measured) after `Error: `."""
    seed_instance(replica, "c1")
    seed_snapshot(replica, "c1", "s1")
    before = stored(replica)
    cases = [
        (["init", "--empty", "1abc"], "Invalid instance name: Name must not start with a number"),
        (
            ["init", "--empty", "c2", "-c", "foo.bar=x"],
            "Failed creating instance record: Unknown configuration key: foo.bar",
        ),
        (
            ["init", "--empty", "c2", "-c", "limits.memory=lots"],
            "Failed creating instance record: Invalid value: lots",
        ),
        (["init", "--empty", "c2", "-p", "nope"], 'Requested profile "nope" doesn\'t exist'),
        (["init", "--empty", "c1"], 'Instance "c1" already exists'),
        (["config", "set", "c1", "limits.cpu", "abc"], "Invalid config: Invalid CPU limit syntax"),
        (
            ["config", "set", "c1", "foo.bar", "x"],
            "Invalid config: Unknown configuration key: foo.bar",
        ),
        (["profile", "add", "c1", "nope"], "Profile not found"),
        (
            ["config", "device", "add", "c1", "e9", "nic"],
            'Invalid devices: Device validation failed for "e9": '
            'Failed loading device "e9": Unsupported device type',
        ),
        (["snapshot", "c1", "a/b"], 'Invalid snapshot name: Cannot contain "/"'),
        (["restore", "c1", "nosnap"], "Snapshot c1/nosnap does not exist"),
        (
            ["config", "show", "c1/nosnap"],
            'Failed to fetch snapshot "nosnap" of instance "c1" in project "default": '
            "InstanceSnapshot not found",
        ),
        (["info", "nope"], "Instance not found"),
    ]
    for args, message in cases:
        result = replica.lxc(*args, check=False)
        assert result.returncode == 1, (args, result)
        assert f"Error: {message}\n" in result.stderr, (args, result.stderr)
    assert stored(replica) == before
    shown = yaml.safe_load(replica.lxc("config", "show", "c1").stdout)
    assert shown["profiles"] == ["default"] and shown["devices"] == {}


# ---------------------------------------------------------------------------- control chars

INJECTED = "lxc.environment = INJECTED=1"
_NIC = {"type": "nic", "network": "croftbr0", "name": "eth1"}
_BRIDGED = {"type": "nic", "nictype": "bridged", "parent": "croftbr0", "name": "eth1"}
_DISK = {"type": "disk", "source": "/srv", "path": "/mnt"}
_CHAR = {"type": "unix-char", "source": "/dev/null", "path": "/dev/null2"}
_CONTROL = "control characters (line breaks, NUL...) are not allowed"
# A device whose option carries LXC configuration after a line break (or CR, NUL): each
# in a place compute would write into the instance's LXC definition.
INJECTING_DEVICES = [
    ("eth1", {**_NIC, "name": f"eth1\n{INJECTED}"}, f'option "name": {_CONTROL}'),
    ("eth1", {**_NIC, "name": f"eth1\r{INJECTED}"}, f'option "name": {_CONTROL}'),
    ("eth1", {**_NIC, "hwaddr": "00:16:3e:00:00:01\n"}, f'option "hwaddr": {_CONTROL}'),
    ("eth1", {**_BRIDGED, "parent": f"croftbr0\n{INJECTED}"}, f'option "parent": {_CONTROL}'),
    ("eth1", {**_NIC, "network": f"croftbr0\n{INJECTED}"}, f'option "network": {_CONTROL}'),
    # A NUL anywhere in a body is refused where the body is read, before any device check.
    ("eth1", {**_NIC, "host_name": f"veth1\x00{INJECTED}"}, "contains a NUL character"),
    ("eth1", {**_NIC, f"user.x\n{INJECTED}": "1"}, f'Invalid device option "user.x\\n{INJECTED}"'),
    ("d1", {**_DISK, "path": f"/mnt\n{INJECTED}"}, f'option "path": {_CONTROL}'),
    ("d1", {**_DISK, "source": f"/srv\n{INJECTED}"}, f'option "source": {_CONTROL}'),
    ("z1", {**_CHAR, "path": f"/dev/z\n{INJECTED}"}, f'option "path": {_CONTROL}'),
    ("z1", {**_CHAR, "source": f"/dev/null\x00{INJECTED}"}, "contains a NUL character"),
    (f"eth1\n{INJECTED}", {"type": "nic", "network": "croftbr0"}, "Name can only contain"),
    ("eth1", {**_NIC, "name": "eth1/x"}, "Network interface contains invalid characters"),
    ("eth1", {**_NIC, "hwaddr": "00:16:3e:00:00"}, "Invalid MAC address"),
    ("d1", {**_DISK, "path": "mnt"}, 'option "path": Must be absolute file path'),
    ("d1", {**_DISK, "source": "srv"}, 'option "source": Must be absolute file path'),
    ("z1", {**_CHAR, "path": "dev/z"}, 'option "path": Must be absolute file path'),
]
INJECTING_CONFIG = [
    ({"environment.X": f"1\n{INJECTED}"}, _CONTROL),
    ({"limits.memory": f"1GiB\n{INJECTED}"}, "control characters"),
    ({"security.nesting": "true\x00"}, "contains a NUL character"),
    ({f"user.a\n{INJECTED}": "1"}, "control characters are not allowed"),
]


def refused_400(replica: Replica, method: str, path: str, body: Any, fragment: str) -> None:
    """A 400 in LXD's error envelope whose message holds `fragment` (escaped: no raw
    line break in a message), and nothing changed in the store."""
    before = stored(replica)
    reply = replica.request(method, path, body)
    assert reply.status == 400, reply
    assert reply.json["type"] == "error" and reply.json["error_code"] == 400
    assert fragment in reply.error, reply.error
    assert "\n" not in reply.error and "\x00" not in reply.error
    assert stored(replica) == before


@pytest.mark.parametrize(("device", "config", "fragment"), INJECTING_DEVICES)
def test_device_names_and_values_that_could_write_lxc_config_are_refused(
    replica: Replica, device: str, config: dict[str, str], fragment: str
) -> None:
    seed_instance(replica, "c1")
    replica.request("POST", "/1.0/profiles", {"name": "p1"})
    devices = {device: config}
    create = {"name": "c2", "source": EMPTY, "devices": devices}
    refused_400(replica, "POST", "/1.0/instances", create, fragment)
    refused_400(replica, "PATCH", "/1.0/instances/c1", {"devices": devices}, fragment)
    put = {"profiles": ["default"], "devices": devices}
    refused_400(replica, "PUT", "/1.0/instances/c1", put, fragment)
    refused_400(replica, "PUT", "/1.0/profiles/p1", {"devices": devices}, fragment)
    refused_400(replica, "POST", "/1.0/profiles", {"name": "p2", "devices": devices}, fragment)


@pytest.mark.parametrize(("config", "fragment"), INJECTING_CONFIG)
def test_config_keys_and_values_with_control_characters_are_refused(
    replica: Replica, config: dict[str, str], fragment: str
) -> None:
    seed_instance(replica, "c1")
    refused_400(replica, "POST", "/1.0/instances", {"name": "c2", "source": EMPTY,
                                                    "config": config}, fragment)  # fmt: skip
    refused_400(replica, "PATCH", "/1.0/instances/c1", {"config": config}, fragment)
    refused_400(replica, "POST", "/1.0/profiles", {"name": "p2", "config": config}, fragment)
