"""What croft answers a client that sends what no endpoint can take (issue 21): LXD's
error envelope with a 400 saying which limit, and nothing written. The limits are
`croft.api.limits`; `tests/test_input.py` fuzzes every endpoint of a whole croft."""

from __future__ import annotations

import json

import pytest

from croft.api import limits, responses
from croft.common.errors import InvalidArgument
from croft.common.store import dump

from .conftest import Replica


def envelope(replica: Replica, method: str, path: str, raw: bytes) -> tuple[int, str]:
    reply = replica.request(method, path, raw=raw, headers={"Content-Type": "application/json"})
    assert reply.json["type"] == "error", reply
    assert reply.json["error_code"] == reply.status, reply
    return reply.status, reply.error


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests objects or arrays more than 32 deep"),
        (
            json.dumps(
                {
                    "name": "p",
                    "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                }
            ).encode(),
            "more than 32 deep",
        ),
        (b'{"name": "p\\ud800"}', "at 'name' is not valid Unicode"),
        (b'{"name": "p", "description": "a\\u0000b"}', "at 'description' contains a NUL"),
        (b'{"name": "p", "config": {"user.\\udc00": "1"}}', "is not valid Unicode"),
        (json.dumps({"name": "p", "description": "x" * (2 << 20)}).encode(), "larger than 1 MiB"),
        (json.dumps({"name": "p", "description": "x" * (65 << 10)}).encode(), "at most 65536"),
        (json.dumps({"name": "p" * 257}).encode(), "at most 256 characters"),
        (
            json.dumps({"name": "p", "config": {"user." + "k" * 300: "1"}}).encode(),
            "longer than 256",
        ),
        (b'{"name": "p", "x": 1' + b"0" * 5000 + b"}", "number out of range"),
        (b'{"name": "p", "x": 18446744073709551616}', "does not fit in 64 bits"),
        (b'{"name": "p", "x": NaN}', "NaN is not a JSON number"),
        (b'{"name": "p", "x": 1e400}', "is out of range"),
        (b"\xff\xfe{}", "not valid JSON"),
        (
            json.dumps(
                {
                    "name": "p",
                    "devices": {"d": {"type": "disk", "path": "/m", "source": "/" + "a" * 300}},
                }
            ).encode(),
            "Device 'd': source: A component of the path is longer than 255 bytes",
        ),
    ],
)
def test_a_body_beyond_the_limits_is_a_400_saying_which(
    replica: Replica, raw: bytes, message: str
) -> None:
    status, error = envelope(replica, "POST", "/1.0/profiles", raw)
    assert status == 400
    assert message in error
    assert replica.request("GET", "/1.0/profiles").metadata == ["/1.0/profiles/default"]


def test_a_record_that_would_grow_past_the_limit_is_refused(replica: Replica) -> None:
    assert replica.request("POST", "/1.0/profiles", {"name": "big"}).status == 201
    value = "v" * limits.MAX_STRING
    for i in range(3):
        reply = replica.request("PATCH", "/1.0/profiles/big", {"config": {f"user.k{i}": value}})
        assert reply.status == 200, reply
    reply = replica.request("PATCH", "/1.0/profiles/big", {"config": {"user.k9": value}})
    assert reply.status == 400
    assert reply.error.startswith("The profile would be larger than 1 MiB")
    assert "user.k9" not in replica.request("GET", "/1.0/profiles/big").metadata["config"]


def test_a_nul_in_a_query_parameter_is_a_400(replica: Replica) -> None:
    status, error = envelope(replica, "GET", "/1.0/profiles?project=a%00b", b"")
    assert (status, error) == (400, "The query parameter 'project' contains a NUL character")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/1.0/networks/..", "Network not found"),
        ("/1.0/networks/%2e%2e", "Network not found"),
        ("/1.0/profiles/.", "Profile not found"),
        ("/1.0/instances/..", "Instance not found"),
        ("/1.0/storage-pools/..", "Storage pool not found"),
        ("/1.0/projects/" + "p" * 300, "Project not found"),
        ("/1.0/images/aliases/a%01b", "Image alias not found"),
    ],
)
def test_a_name_no_object_can_have_is_lxds_404(replica: Replica, path: str, message: str) -> None:
    assert envelope(replica, "GET", path, b"") == (404, message)


def test_a_stored_lone_surrogate_still_renders(replica: Replica) -> None:
    # Written before croft refused them: the answer is still JSON, in an envelope.
    record = {"name": "old", "description": "\ud800", "config": {}, "devices": {}}
    replica.run(replica.ctx.store.create("/croft/records/profiles/default/old", dump(record)))
    reply = replica.request("GET", "/1.0/profiles/old")
    assert reply.status == 200
    assert reply.metadata["description"] == "\ud800"


def test_an_error_message_always_renders() -> None:
    # Whatever a message holds (a client's lone surrogate, a megabyte), the client gets
    # an envelope, never a bare "Internal Server Error".
    for message in ("bad \ud800 name", "x" * (1 << 20)):
        response = responses.error(InvalidArgument(message))
        body = json.loads(response.body.decode("utf-8"))
        assert (response.status_code, body["type"], body["error_code"]) == (400, "error", 400)
        assert len(body["error"]) < limits.MAX_MESSAGE + 100


def test_a_profile_change_that_would_make_an_instance_too_large_is_refused(
    replica: Replica,
) -> None:
    value = "v" * limits.MAX_STRING
    assert replica.request("POST", "/1.0/profiles", {"name": "shared"}).status == 201
    # An instance using it, as compute records one (no compute runs here: the change is
    # refused before any is asked).
    own = {"user.own": value}
    instance = {
        "name": "c1",
        "project": "default",
        "status": "Stopped",
        "profiles": ["shared"],
        "config": own,
        "devices": {},
        "expanded_config": own,
        "expanded_devices": {},
        "_croft": {"state": "created", "member": "nowhere"},
    }
    replica.run(replica.ctx.store.create("/croft/records/instances/default/c1", dump(instance)))
    config = {"user.a": value, "user.b": value}
    reply = replica.request("PATCH", "/1.0/profiles/shared", {"config": config})
    assert reply.status == 400
    assert reply.error.startswith(
        'Invalid profile for instance "c1": The instance would be larger than 1 MiB'
    )
    assert replica.request("GET", "/1.0/profiles/shared").metadata["config"] == {}
