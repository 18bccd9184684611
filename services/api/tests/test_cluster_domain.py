"""A cluster member's status and roles, and join tokens, as LXD 5.0.2 shows them (the
cluster itself is tested end to end in tests/test_cluster.py)."""

from __future__ import annotations

import base64
import json

import pytest

from croft.api.domain import cluster
from croft.common.cluster import Heartbeat, MemberRecord
from croft.common.errors import InvalidArgument


def test_a_join_token_is_lxds_base64_json_and_decodes_back() -> None:
    token = cluster.JoinToken("m2", "ab" * 32, ["10.0.0.1:8443"], "s3cret", "2026-12-07T10:00:00Z")
    decoded = json.loads(base64.b64decode(token.encode()))
    assert decoded == {
        "server_name": "m2",
        "fingerprint": "ab" * 32,
        "addresses": ["10.0.0.1:8443"],
        "secret": "s3cret",
        "expires_at": "2026-12-07T10:00:00Z",
    }
    assert cluster.decode_token(token.encode()) == token


@pytest.mark.parametrize("text", ["", "not base64!", base64.b64encode(b"[1]").decode(),
                                  base64.b64encode(b'{"server_name": "x"}').decode()])  # fmt: skip
def test_a_token_that_is_none_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="Invalid cluster join token"):
        cluster.decode_token(text)


def test_a_member_is_online_within_the_threshold_and_offline_after() -> None:
    member = MemberRecord(name="m1", id=1, address="10.0.0.1:8443")
    beat = Heartbeat(at=1000.0, voter=True, leader=True)
    online = cluster.view(member, beat, threshold=20, now=1010.0)
    assert (online.status, online.message) == ("Online", "Fully operational")
    assert online.roles == ["database-leader", "database"]
    assert online.render()["database"] is True
    offline = cluster.view(member, beat, threshold=20, now=1065.5)
    assert offline.status == "Offline"
    assert offline.message.startswith("No heartbeat for 1m5.5s (1970-01-01 00:16:40")
    learner = cluster.view(member, Heartbeat(at=1000.0, learner=True), threshold=20, now=1000.0)
    assert learner.roles == ["database-standby"]


def test_an_evacuated_member_shows_lxds_status_and_message() -> None:
    record = MemberRecord(name="m2", id=2, address="10.0.0.2:8443", state="evacuated")
    shown = cluster.view(record, Heartbeat(at=100.0, voter=True), 20, 105.0).render()
    assert (shown["status"], shown["message"]) == ("Evacuated", "Unavailable due to maintenance")


def test_a_renamed_member_is_renamed_where_records_name_it_and_nowhere_else() -> None:
    from croft.common.cluster import rename_member_references

    record = {
        "name": "c1",
        "location": "m2",
        "config": {"user.note": "m2"},
        "_croft": {"member": "m2", "members": {"m1": {}, "m2": {"state": "created"}}},
    }
    assert rename_member_references(record, "m2", "m9")
    assert record["location"] == "m9" and record["_croft"]["member"] == "m9"
    assert record["_croft"]["members"] == {"m1": {}, "m9": {"state": "created"}}
    assert record["config"] == {"user.note": "m2"}  # a user's value is not a reference
    assert not rename_member_references({"name": "x", "_croft": {"member": "m1"}}, "m2", "m9")


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "No name provided"),
        ("a/b", "may not contain slashes"),
        ("a b", "may not contain spaces"),
        ("a_b", "may not contain underscores"),
        ('a"b', "may not contain quotes"),
        ("*", "Reserved cluster group name"),
        ("..", "Invalid cluster group name"),
    ],
)
def test_cluster_group_names_are_checked_as_lxd_does(name: str, error: str) -> None:
    from croft.api.domain.cluster_groups import validate_name

    with pytest.raises(InvalidArgument, match=error):
        validate_name(name)
