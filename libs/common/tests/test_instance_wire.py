"""Instance and snapshot records across the compute RPCs (`croft.common.models.
instance_wire`): a record sent is the record received, down to the fields it does not
have and the ones croft does not model, for records a real croft wrote
(`fixtures/records.json`) and for the partial ones the api sends."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from croft.common.models import InstanceRecord, SnapshotRecord
from croft.common.models.instance_wire import (
    instance_from_wire,
    instance_to_wire,
    snapshot_from_wire,
    snapshot_to_wire,
)
from croft.v1 import compute_pb2

Captured = list[tuple[str, dict[str, Any]]]


def sent(record: InstanceRecord) -> InstanceRecord:
    """`record` as the other side of a call gets it: encoded, as bytes, decoded."""
    wire = instance_to_wire(record).SerializeToString()
    return instance_from_wire(compute_pb2.Instance.FromString(wire))


def of_kind(captured: Captured, kind: str) -> list[dict[str, Any]]:
    found = [raw for key, raw in captured if f"/records/{kind}/" in key]
    assert found, f"no captured {kind} record"
    return found


def test_a_stored_instance_crosses_the_wire_as_it_is(captured_records: Captured) -> None:
    for raw in of_kind(captured_records, "instances"):
        received = sent(InstanceRecord.model_validate(raw))
        assert received.dump() == raw
        assert received.croft.member and received.croft.pool == "default"
        assert received.expanded_devices["root"]["path"] == "/"


def test_a_snapshot_crosses_the_wire_as_it_is(captured_records: Captured) -> None:
    for raw in of_kind(captured_records, "instance-snapshots"):
        wire = snapshot_to_wire(SnapshotRecord.model_validate(raw)).SerializeToString()
        received = snapshot_from_wire(compute_pb2.InstanceSnapshot.FromString(wire))
        assert received.dump() == raw
        assert received.croft.pool == "default"


def test_what_croft_does_not_model_and_what_a_record_lacks_survive(
    captured_records: Captured,
) -> None:
    raw = of_kind(captured_records, "instances")[0]
    odd = {
        **{k: v for k, v in raw.items() if k not in ("stateful", "location")},
        "backups": [],
        "_croft": {"member": "m", "state": "creating", "pool": "p", "x": {"y": 1}},
    }
    received = sent(InstanceRecord.model_validate(odd))
    assert received.dump() == odd
    assert "stateful" not in received.dump() and received.public()["backups"] == []
    # None in an optional meta field, and no meta at all, are both kept apart from "".
    renaming = InstanceRecord.model_validate({"name": "c", "_croft": {"renaming": None}})
    assert sent(renaming).dump() == {"name": "c", "_croft": {"renaming": None}}
    assert sent(InstanceRecord(name="c")).dump() == {"name": "c"}


def test_the_record_of_a_create_arrives_as_the_api_made_it() -> None:
    # The api leaves `type` empty for compute's default, and sends no `_croft`.
    record = InstanceRecord(
        name="c1",
        type="",
        config={"limits.memory": "1GiB"},
        devices={"eth0": {"type": "nic", "network": "lxdbr0"}},
        expanded_devices={"root": {"type": "disk", "path": "/", "pool": "default"}},
        profiles=["default"],
    )
    received = sent(record)
    assert received.dump() == record.dump()
    assert "_croft" not in received.dump() and received.type == ""


def test_a_message_that_is_no_record_is_refused() -> None:
    wire = instance_to_wire(InstanceRecord(name="c", croft={"state": "created"}))
    wire.croft.state = "half-done"
    with pytest.raises(ValidationError):
        instance_from_wire(wire)
