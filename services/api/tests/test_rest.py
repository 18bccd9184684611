"""The REST surface as LXD clients meet it: envelopes, errors, the server, projects.

Expected bodies and messages were taken from a real LXD 5.0.2 on this machine
(`curl --unix-socket /var/lib/lxd/unix.socket ...`); where croft differs on purpose
the test says why.
"""

from __future__ import annotations

import json
import os
import stat

import pylxd
import pytest
import yaml

from .conftest import Replica

SYNC_KEYS = ["type", "status", "status_code", "operation", "error_code", "error", "metadata"]


def test_root_lists_the_api_versions(replica: Replica) -> None:
    reply = replica.request("GET", "/")
    assert reply.status == 200
    assert list(reply.json) == SYNC_KEYS
    assert reply.json == {
        "type": "sync",
        "status": "Success",
        "status_code": 200,
        "operation": "",
        "error_code": 0,
        "error": "",
        "metadata": ["/1.0"],
    }
    assert reply.headers["Content-Type"] == "application/json"


def test_server_info_as_lxc_info_shows_it(replica: Replica) -> None:
    info = yaml.safe_load(replica.lxc("info").stdout)
    assert info["api_version"] == "1.0"
    assert info["api_status"] == "stable"
    assert info["auth"] == "trusted"
    assert "projects" in info["api_extensions"]
    env = info["environment"]
    assert env["server"] == "croft"
    assert env["server_name"] == "croft-test"
    assert env["kernel"] == "Linux"
    assert env["kernel_version"] == os.uname().release
    assert env["project"] == "default"
    # The drivers are what live storage services report; none runs beside this replica.
    assert (env["storage"], env["storage_supported_drivers"]) == ("", [])


def test_unknown_path_is_lxds_404(replica: Replica) -> None:
    for path in ("/1.0/nope", "/nope", "/1.0/profiles/default/extra"):
        reply = replica.request("GET", path)
        assert reply.status == 404, path
        assert reply.json == {
            "type": "error",
            "status": "",
            "status_code": 0,
            "operation": "",
            "error_code": 404,
            "error": "not found",
            "metadata": None,
        }


def test_method_without_handler_is_lxds_501(replica: Replica) -> None:
    # LXD answers a known path with a method it does not serve "501 not implemented".
    for method, path in (("DELETE", "/1.0"), ("POST", "/1.0"), ("PUT", "/1.0/profiles")):
        reply = replica.request(method, path, {})
        assert (reply.status, reply.error) == (501, "not implemented"), (method, path)


def test_malformed_json_is_400_and_changes_nothing(replica: Replica) -> None:
    for raw in (b'{"name":"p2",', b"", b"[1]", b'{"name": 5}', b'{"name":"x","config":"str"}'):
        reply = replica.request("POST", "/1.0/profiles", raw=raw)
        assert reply.status == 400, raw
        assert reply.json["type"] == "error" and reply.json["error_code"] == 400
        assert reply.error
    names = replica.request("GET", "/1.0/profiles").metadata
    assert names == ["/1.0/profiles/default"]


def test_server_config_put_patch_and_validation(replica: Replica) -> None:
    reply = replica.request("PATCH", "/1.0", {"config": {"foo": "bar"}})
    assert (reply.status, reply.error) == (400, "cannot set 'foo' to 'bar': unknown key")
    reply = replica.request("PATCH", "/1.0", {"config": {"images.auto_update_cached": "maybe"}})
    assert reply.status == 400
    assert "images.auto_update_cached" in reply.error

    reply = replica.request("PATCH", "/1.0", {"config": {"user.a": "b"}})
    assert (reply.status, reply.metadata) == (200, {})
    reply = replica.request("PATCH", "/1.0", {"config": {"images.auto_update_interval": "6"}})
    assert reply.status == 200
    assert replica.request("GET", "/1.0").metadata["config"] == {
        "user.a": "b",
        "images.auto_update_interval": "6",
    }
    # lxc config set/unset drive the same PATCH/PUT.
    replica.lxc("config", "set", "core.https_address", "127.0.0.1:8443")
    replica.lxc("config", "unset", "user.a")
    assert replica.lxc("config", "get", "core.https_address").stdout.strip() == "127.0.0.1:8443"
    server = replica.request("GET", "/1.0")
    assert "user.a" not in server.metadata["config"]

    # PUT replaces the whole config; a stale ETag is refused.
    etag = server.headers["ETag"]
    reply = replica.request("PUT", "/1.0", {"config": {}}, headers={"If-Match": '"abc"'})
    assert reply.status == 412
    assert reply.error.startswith("ETag doesn't match: ")
    reply = replica.request("PUT", "/1.0", {"config": {"user.x": "y"}}, headers={"If-Match": etag})
    assert reply.status == 200
    assert replica.request("GET", "/1.0").metadata["config"] == {"user.x": "y"}


def test_projects_default_only(replica: Replica) -> None:
    listed = replica.request("GET", "/1.0/projects")
    assert listed.metadata == ["/1.0/projects/default"]
    shown = replica.request("GET", "/1.0/projects/default")
    assert shown.headers["ETag"]
    assert shown.metadata == {
        "config": {
            "features.images": "true",
            "features.networks": "true",
            "features.profiles": "true",
            "features.storage.volumes": "true",
        },
        "description": "Default LXD project",
        "name": "default",
        "used_by": ["/1.0/profiles/default"],
    }
    missing = replica.request("GET", "/1.0/projects/nope")
    assert (missing.status, missing.error) == (404, "Project not found")
    unknown = replica.request("GET", "/1.0/profiles?project=nope")
    assert (unknown.status, unknown.error) == (
        404,
        'Failed loading project "nope": Project not found',
    )

    # The server itself answers whatever project is named, as LXD 5.0 does: a remote
    # whose project was deleted can still reach the server to pick another.
    server = replica.request("GET", "/1.0?project=nope")
    assert server.status == 200
    assert server.metadata["environment"]["project"] == "nope"

    table = replica.lxc("project", "list", "--format", "csv").stdout
    assert table.startswith("default (current),")

    client = pylxd.Client(endpoint=str(replica.socket))
    (project,) = client.projects.all()
    assert project.name == "default"
    assert project.config["features.profiles"] == "true"


def test_socket_is_root_only(replica: Replica) -> None:
    mode = stat.S_IMODE(replica.socket.stat().st_mode)
    assert mode == 0o660


def test_async_response_envelope(replica: Replica) -> None:
    from croft.api import responses

    operation = {"id": "0a1b", "class": "task", "status": "Running"}
    response = responses.async_operation(operation)
    assert response.status_code == 202
    assert response.headers["Location"] == "/1.0/operations/0a1b"
    assert json.loads(response.body) == {
        "type": "async",
        "status": "Operation created",
        "status_code": 100,
        "operation": "/1.0/operations/0a1b",
        "error_code": 0,
        "error": "",
        "metadata": operation,
    }


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("name eq default", ["default"]),
        ("name ne default", ["web", "db"]),
        ("name eq w.*", ["web"]),
        ("config.limits.cpu eq 2", ["web"]),
        ("config.limits.cpu eq 2 or name eq db", ["web", "db"]),
        ('not name eq default and description eq "the database"', ["db"]),
        ("devices.root.pool eq default", ["default"]),
    ],
)
def test_filters_select_profiles(replica: Replica, expression: str, expected: list[str]) -> None:
    replica.request("POST", "/1.0/profiles", {"name": "web", "config": {"limits.cpu": "2"}})
    replica.request("POST", "/1.0/profiles", {"name": "db", "description": "the database"})
    reply = replica.request(
        "GET", "/1.0/profiles?recursion=1&filter=" + expression.replace(" ", "+")
    )
    assert reply.status == 200, reply
    assert sorted(p["name"] for p in reply.metadata) == sorted(expected)


def test_bad_filter_is_400(replica: Replica) -> None:
    reply = replica.request("GET", "/1.0/profiles?filter=name+gt+x")
    assert reply.status == 400
    assert "gt" in reply.error
