"""`/1.0/projects` over REST, on an api replica and a real etcd: statuses, ETags,
the rename operation, events, what a project shares with `default`, and the limit
check every instance create goes through (LXD 5.0.2's answers, measured)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.sync.client import unix_connect

from croft.common.records import record_key
from croft.common.store import connect, dump

from .conftest import Replica


def wait(replica: Replica, operation: str) -> dict[str, Any]:
    reply = replica.request("GET", f"{operation}/wait?timeout=30")
    assert reply.status == 200, reply
    result: dict[str, Any] = reply.metadata
    return result


def put_records(endpoints: list[str], records: dict[str, dict[str, Any]]) -> None:
    """Write records the way their owning service would (compute's instances)."""

    async def write() -> None:
        store = await connect(endpoints)
        try:
            for key, record in records.items():
                await store.put(key, dump(record))
        finally:
            await store.close()

    asyncio.run(write())


def test_create_show_change_and_delete(replica: Replica) -> None:
    created = replica.request("POST", "/1.0/projects", {"name": "pa", "description": "A"})
    assert created.status == 201 and created.headers["Location"] == "/1.0/projects/pa"
    again = replica.request("POST", "/1.0/projects", {"name": "pa"})
    assert again.status == 409
    assert again.error == (
        'Failed creating project "pa": Failed adding database record: '
        'This "projects" entry already exists'
    )
    shown = replica.request("GET", "/1.0/projects/pa")
    assert shown.metadata["config"]["features.profiles"] == "true"
    assert "features.networks" not in shown.metadata["config"]
    assert shown.metadata["used_by"] == ["/1.0/profiles/default?project=pa"]
    etag = shown.headers["ETag"]

    stale = replica.request(
        "PUT", "/1.0/projects/pa", {"config": {}}, headers={"If-Match": '"nope"'}
    )
    assert stale.status == 412
    patched = replica.request(
        "PATCH", "/1.0/projects/pa", {"config": {"limits.instances": "3"}},
        headers={"If-Match": etag},
    )  # fmt: skip
    assert patched.status == 200, patched
    config = replica.request("GET", "/1.0/projects/pa").metadata["config"]
    assert config["limits.instances"] == "3" and config["features.images"] == "true"

    bad = replica.request("PATCH", "/1.0/projects/pa", {"config": {"restricted": "maybe"}})
    assert bad.status == 400
    assert bad.error == (
        'Invalid project configuration key "restricted" value: Invalid value for a boolean "maybe"'
    )
    unshared = replica.request(
        "PATCH", "/1.0/projects/pa",
        {"config": {"features.profiles": "false", "restricted": "true"}},
    )  # fmt: skip
    assert unshared.error == "Projects without their own profiles cannot be restricted"

    state = replica.request("GET", "/1.0/projects/pa/state").metadata["resources"]
    assert state["instances"] == {"Limit": 3, "Usage": 0}
    assert state["memory"] == {"Limit": -1, "Usage": 0}
    assert replica.request("GET", "/1.0/projects/nope/state").error == (
        "Fetch project database object: Project not found"
    )

    assert replica.request("DELETE", "/1.0/projects/default").status == 403
    assert replica.request("POST", "/1.0/projects/default", {"name": "x"}).status == 403
    missing = replica.request("DELETE", "/1.0/projects/nope")
    assert (missing.status, missing.error) == (404, 'Fetch project "nope": Project not found')
    assert replica.request("DELETE", "/1.0/projects/pa").status == 200
    assert replica.request("GET", "/1.0/projects/pa").status == 404
    assert replica.request("GET", "/1.0/profiles?project=pa").error == (
        'Failed loading project "pa": Project not found'
    )
    assert replica.request("GET", "/1.0/images/aliases?project=pa").error == (
        "Check if project has images: fetch project: Project not found"
    )
    assert replica.request("GET", "/1.0/projects").metadata == ["/1.0/projects/default"]


def test_rename_is_an_operation(replica: Replica) -> None:
    for name in ("pa", "pb"):
        replica.request("POST", "/1.0/projects", {"name": name})
    clash = replica.request("POST", "/1.0/projects/pa", {"name": "pb"})
    assert clash.status == 202
    assert wait(replica, clash.json["operation"])["err"] == 'A project named "pb" already exists'
    renamed = replica.request("POST", "/1.0/projects/pa", {"name": "pc"})
    assert wait(replica, renamed.json["operation"])["status"] == "Success"
    assert replica.request("GET", "/1.0/projects/pa").status == 404
    assert replica.request("GET", "/1.0/profiles/default?project=pc").status == 200
    assert replica.request("GET", "/1.0/profiles/default?project=pa").status == 404


def test_a_project_without_its_own_profiles_uses_defaults(replica: Replica) -> None:
    replica.request(
        "POST", "/1.0/projects", {"name": "ps", "config": {"features.profiles": "false"}}
    )
    assert replica.request("GET", "/1.0/projects/ps").metadata["used_by"] == []
    assert replica.request("GET", "/1.0/profiles?project=ps").metadata == ["/1.0/profiles/default"]
    # A profile made "in" it is default's, as in LXD.
    replica.request("POST", "/1.0/profiles?project=ps", {"name": "web"})
    assert "/1.0/profiles/web" in replica.request("GET", "/1.0/profiles").metadata
    # Turning the feature on gives it its own (empty) default profile.
    replica.request("PATCH", "/1.0/projects/ps", {"config": {"features.profiles": "true"}})
    own = replica.request("GET", "/1.0/profiles/default?project=ps").metadata
    assert own["devices"] == {} and own["description"] == "Default LXD profile for project ps"


def test_lifecycle_events_of_a_project_reach_its_listeners(replica: Replica) -> None:
    for name in ("pa", "pb"):
        replica.request("POST", "/1.0/projects", {"name": name})
    url = "ws://lxd/1.0/events?type=lifecycle&project=pa"
    with unix_connect(str(replica.socket), url) as ws:
        replica.request("POST", "/1.0/profiles?project=pb", {"name": "only-b"})
        replica.request("POST", "/1.0/profiles?project=pa", {"name": "only-a"})
        event = json.loads(ws.recv(timeout=30))
        assert event["project"] == "pa"
        assert event["metadata"]["action"] == "profile-created"
        assert event["metadata"]["source"] == "/1.0/profiles/only-a?project=pa"


def test_limits_refuse_a_create_before_anything_is_made(replica: Replica, clean_store: Any) -> None:
    replica.request("POST", "/1.0/projects", {"name": "pl", "config": {"limits.instances": "1"}})
    put_records(
        clean_store.endpoints,
        {
            record_key("instances", "pl", "one"): {
                "name": "one", "project": "pl", "type": "container",
                "expanded_config": {"limits.memory": "256MiB"}, "expanded_devices": {},
            },
        },
    )  # fmt: skip
    body = {
        "name": "two",
        "source": {"type": "none"},
        "devices": {"root": {"type": "disk", "path": "/", "pool": "default"}},
    }
    refused = replica.request("POST", "/1.0/instances?project=pl", body)
    assert (refused.status, refused.error) == (
        400,
        'Reached maximum number of instances in project "pl"',
    )
    # In use: it cannot go.
    in_use = replica.request("DELETE", "/1.0/projects/pl")
    assert (in_use.status, in_use.error) == (400, "Only empty projects can be removed")
    assert replica.request("GET", "/1.0/instances?project=pl").metadata == [
        "/1.0/instances/one?project=pl"
    ]
    # Raising the limit below what is there is refused too.
    replica.request("PATCH", "/1.0/projects/pl", {"config": {"limits.instances": "5"}})
    low = replica.request("PATCH", "/1.0/projects/pl", {"config": {"limits.instances": "0"}})
    assert low.error == (
        'Can\'t change limits.instances in project "pl": "limits.instances" is too low: '
        'there currently are 1 total instances in project "pl"'
    )
    memory = replica.request("PATCH", "/1.0/projects/pl", {"config": {"limits.memory": "100MiB"}})
    assert memory.error == '"limits.memory" is too low: current total is "256.0MiB"'
    cpu = replica.request("PATCH", "/1.0/projects/pl", {"config": {"limits.cpu": "4"}})
    assert cpu.error == (
        'Instance "one" in project "pl" has no "limits.cpu" config, either directly or via a '
        "profile"
    )
    assert "limits.cpu" not in replica.request("GET", "/1.0/projects/pl").metadata["config"]


def test_a_start_is_held_to_the_projects_restrictions(replica: Replica, clean_store: Any) -> None:
    """An instance that breaks its project's restrictions (written before they were
    set, say) is refused a start, before any compute is asked."""
    replica.request("POST", "/1.0/projects", {"name": "pr", "config": {"restricted": "true"}})
    put_records(
        clean_store.endpoints,
        {
            record_key("instances", "pr", "old"): {
                "name": "old", "project": "pr", "type": "container", "status": "Stopped",
                "config": {}, "devices": {}, "profiles": [],
                "expanded_config": {"security.privileged": "true"}, "expanded_devices": {},
                "_croft": {"member": "none", "state": "created"},
            },
        },
    )  # fmt: skip
    refused = replica.request("PUT", "/1.0/instances/old/state?project=pr", {"action": "start"})
    assert (refused.status, refused.error) == (
        400,
        'Failed checking if instance start allowed: Invalid value "true" for config '
        '"security.privileged" on container "old" of project "pr": Privileged containers are '
        "forbidden",
    )


def test_the_checks_for_networks_and_volumes(replica: Replica, clean_store: Any) -> None:
    """The checks the network and volume routes call before they make one."""
    from croft.api.domain import projects
    from croft.common.errors import InvalidArgument

    replica.request(
        "POST", "/1.0/projects",
        {"name": "pn", "config": {"features.networks": "true", "limits.networks": "1",
                                  "limits.disk": "1GiB"}},
    )  # fmt: skip
    put_records(
        clean_store.endpoints,
        {
            record_key("networks", "pn", "n1"): {"name": "n1"},
            # As the storage service keeps it: under default, named by the project.
            record_key("storage-volumes", "default", "default/custom/pn_v1"): {
                "name": "v1", "type": "custom", "project": "pn", "config": {"size": "600MiB"},
                "_croft": {"pool": "default", "volume": "pn_v1"},
            },
        },
    )  # fmt: skip
    store = replica.ctx.store

    async def refusal(check: Any) -> str:
        try:
            await check
        except InvalidArgument as exc:
            return exc.message
        return ""

    assert replica.run(refusal(projects.check_network_creation(store, "pn", "n2"))) == (
        "Networks limit has been reached for project"
    )
    assert replica.run(refusal(projects.check_network_creation(store, "pn", "n1"))) == ""
    # default's networks are not counted against a project that shares them.
    assert replica.run(refusal(projects.check_network_creation(store, "default", "x"))) == ""
    assert replica.run(refusal(projects.check_volume(store, "pn", "v2", {"size": "600MiB"}))) == (
        'Failed checking if volume creation allowed: Reached maximum aggregate value "1GiB" '
        'for "limits.disk" in project "pn"'
    )
    assert replica.run(refusal(projects.check_volume(store, "pn", "v2", {}))) == (
        "Failed checking if volume creation allowed: Failed getting usage of project entities: "
        'Custom volume "v2" in project "pn" has no "size" config set'
    )
    assert replica.run(refusal(projects.check_volume(store, "pn", "v2", {"size": "100MiB"}))) == ""
    assert replica.run(
        refusal(projects.check_volume(store, "pn", "v1", {"size": "2GiB"}, "update"))
    ) == (
        'Failed checking if volume update allowed: Reached maximum aggregate value "1GiB" '
        'for "limits.disk" in project "pn"'
    )
    state = replica.request("GET", "/1.0/projects/pn/state").metadata["resources"]
    assert state["networks"] == {"Limit": 1, "Usage": 1}
    assert state["disk"] == {"Limit": 1024**3, "Usage": 600 * 1024**2}


def test_vm_and_process_limits_refuse_a_create(replica: Replica, clean_store: Any) -> None:
    """`limits.virtual-machines` counts VMs only; `limits.processes` is an aggregate of
    the instances' own `limits.processes`, as `limits.cpu` is."""
    replica.request("POST", "/1.0/projects", {"name": "pv", "config": {
        "limits.virtual-machines": "0", "limits.processes": "100"}})  # fmt: skip
    put_records(
        clean_store.endpoints,
        {
            record_key("instances", "pv", "one"): {
                "name": "one", "project": "pv", "type": "container",
                "expanded_config": {"limits.processes": "80"}, "expanded_devices": {},
            },
        },
    )  # fmt: skip
    root = {"root": {"type": "disk", "path": "/", "pool": "default"}}
    vm = replica.request("POST", "/1.0/instances?project=pv", {
        "name": "vm", "type": "virtual-machine", "source": {"type": "none"}, "devices": root,
        "config": {"limits.processes": "1"}})  # fmt: skip
    assert (vm.status, vm.error) == (
        400, 'Reached maximum number of instances of type "virtual-machine" in project "pv"')  # fmt: skip
    many = replica.request("POST", "/1.0/instances?project=pv", {
        "name": "two", "source": {"type": "none"}, "devices": root,
        "config": {"limits.processes": "30"}})  # fmt: skip
    assert (many.status, many.error) == (
        400, 'Failed checking if instance creation allowed: Reached maximum aggregate value '
        '"100" for "limits.processes" in project "pv"')  # fmt: skip
    unset = replica.request("POST", "/1.0/instances?project=pv", {
        "name": "two", "source": {"type": "none"}, "devices": root})  # fmt: skip
    assert unset.status == 400 and 'no "limits.processes" config' in unset.error, unset.error
    low = replica.request("PATCH", "/1.0/projects/pv", {"config": {"limits.processes": "50"}})
    assert low.status == 400 and "limits.processes" in low.error, low.error
    assert replica.request("GET", "/1.0/instances?project=pv").metadata == [
        "/1.0/instances/one?project=pv"]  # fmt: skip


def test_restricted_devices_are_refused_in_lxds_words(replica: Replica) -> None:
    """`restricted=true` blocks every `restricted.devices.*` kind but managed NICs and
    pool disks until the project allows it; the messages are LXD 5.0.2's (measured with
    `lxc profile device add` against it), and nothing is changed."""
    replica.request("POST", "/1.0/projects", {"name": "pd", "config": {"restricted": "true"}})
    assert replica.request("POST", "/1.0/profiles?project=pd", {"name": "p"}).status == 201
    url = "/1.0/profiles/p?project=pd"
    prefix = 'Failed checking if profile update allowed: Invalid device "d" on profile "p" of '
    for device, problem in (
        ({"type": "unix-char", "path": "/dev/zero"}, "Unix character devices are forbidden"),
        ({"type": "gpu"}, "GPU devices are forbidden"),
        ({"type": "proxy", "listen": "tcp:127.0.0.1:1", "connect": "tcp:127.0.0.1:2"},
         "Proxy devices are forbidden"),
        ({"type": "nic", "nictype": "bridged", "parent": "br0"},
         "Only managed network devices are allowed"),
        ({"type": "disk", "source": "/tmp", "path": "/mnt"},
         "Attaching disks not backed by a pool is forbidden"),
    ):  # fmt: skip
        refused = replica.request("PUT", url, {"config": {}, "devices": {"d": device}})
        assert (refused.status, refused.error) == (400, f'{prefix}project "pd": {problem}')
        assert replica.request("GET", url).metadata["devices"] == {}
    replica.request(
        "PATCH", "/1.0/projects/pd", {"config": {"restricted.devices.unix-char": "allow"}}
    )
    allowed = {"type": "unix-char", "path": "/dev/zero"}
    assert replica.request("PUT", url, {"config": {}, "devices": {"d": allowed}}).status == 200
    assert replica.request("GET", url).metadata["devices"] == {"d": allowed}
