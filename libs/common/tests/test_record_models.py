"""The typed record models against records a real croft wrote
(`fixtures/records.json`, captured by `tests/test_record_models.py` after a launch, a
snapshot, an image import with an alias and a profile), and against the older shapes the
store may still hold. A record read and written back is the record that was read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from croft.common import records
from croft.common.models import (
    MODELS,
    ImageAliasRecord,
    ImageRecord,
    InstanceMeta,
    InstanceRecord,
    NetworkNic,
    NetworkRecord,
    OperationRecord,
    ProjectRecord,
    StoragePoolRecord,
    StorageVolumeRecord,
    model_of,
)
from croft.common.models.operation import OPERATIONS

CAPTURED: list[tuple[str, dict[str, Any]]] = [
    (key, value)
    for key, value in json.loads((Path(__file__).parent / "fixtures/records.json").read_text())
]


def one(kind: str) -> dict[str, Any]:
    return next(raw for key, raw in CAPTURED if key.startswith(f"{records.RECORDS}{kind}/"))


@pytest.mark.parametrize(("key", "raw"), CAPTURED, ids=[key for key, _ in CAPTURED])
def test_a_captured_record_round_trips(key: str, raw: dict[str, Any]) -> None:
    model = model_of(key)
    if model is None:
        pytest.fail(f"no model for {key}")
    parsed = model.model_validate(raw)
    assert parsed.dump() == raw
    # The stored JSON is the same document again.
    assert json.loads(json.dumps(parsed.dump())) == raw


def test_every_kind_was_captured() -> None:
    kinds = {model_of(key) for key, _ in CAPTURED}
    assert set(MODELS.values()) | {OperationRecord} <= kinds


def test_public_drops_croft_as_records_public_does() -> None:
    for kind in ("instances", "instance-snapshots", "storage-pools", "networks", "images"):
        raw = one(kind)
        assert "_croft" in raw
        parsed = MODELS[kind].model_validate(raw)
        assert parsed.public() == records.public(raw)  # type: ignore[attr-defined]
        assert "_croft" not in parsed.public()  # type: ignore[attr-defined]


def test_keys_are_where_the_records_are() -> None:
    nics = [
        (key, raw) for key, raw in CAPTURED if key.startswith(f"{records.RECORDS}network-nics/")
    ]
    assert nics
    for key, raw in nics:
        network, project, instance, device = key.split("/")[-4:]
        assert NetworkNic.store_key(network, project, instance, device) == key
        assert NetworkNic.model_validate(raw).hwaddr
    keys = dict((raw_key, raw) for raw_key, raw in CAPTURED)
    instance = InstanceRecord.model_validate(one("instances"))
    assert keys[instance.key()] is not None
    pool = StoragePoolRecord.model_validate(one("storage-pools"))
    assert pool.key() in keys
    for key, raw in CAPTURED:
        if key.startswith(f"{records.RECORDS}storage-volumes/"):
            assert StorageVolumeRecord.model_validate(raw).key() == key
        if key.startswith(f"{records.RECORDS}networks/"):
            assert NetworkRecord.model_validate(raw).key() == key
        if key.startswith(OPERATIONS):
            assert OperationRecord.model_validate(raw).key() == key
    image = ImageRecord.model_validate(one("images"))
    assert image.key("default") in keys
    assert ImageAliasRecord.model_validate(one("image-aliases")).key("default") in keys
    assert ProjectRecord.model_validate(one("projects")).key() in keys


def test_the_croft_meta_is_typed() -> None:
    instance = InstanceRecord.model_validate(one("instances"))
    assert isinstance(instance.croft, InstanceMeta)
    assert instance.croft.state == "created" and not instance.croft.creating
    assert instance.croft.pool == "default" and instance.croft.rootfs
    assert InstanceRecord.meta_of(one("instances")) == instance.croft
    pool = StoragePoolRecord.model_validate(one("storage-pools"))
    assert {m.state for m in pool.croft.members.values()} == {"created"}
    image = ImageRecord.model_validate(one("images"))
    assert image.is_public is False and image.public()["public"] is False


def test_fields_croft_does_not_model_survive() -> None:
    raw = {**one("instances"), "backups": [], "_croft": {**one("instances")["_croft"], "x": 1}}
    parsed = InstanceRecord.model_validate(raw)
    assert parsed.dump() == raw
    assert parsed.public()["backups"] == []


def test_older_shapes_still_read() -> None:
    # A pool of the one-owner shape; an instance from before definitions and volumes
    # were recorded; a network owning its NICs.
    pool = {"name": "p", "driver": "dir", "config": {"source": "/x"}, "_croft": {"member": "m"}}
    assert StoragePoolRecord.model_validate(pool).croft.member == "m"
    assert StoragePoolRecord.members_of(pool) == {}
    assert StoragePoolRecord.model_validate(pool).dump() == pool
    old = {"name": "c", "_croft": {"member": "m", "state": "created", "pool": "p"}}
    meta = InstanceRecord.meta_of(old)
    assert meta.definition is None and meta.volume is None
    assert InstanceRecord.model_validate(old).dump() == old
    assert InstanceRecord.meta_of({"name": "c"}) == InstanceMeta()
    net = {"name": "n", "type": "bridge", "_croft": {"member": "m", "nics": {"a/b/c": {}}}}
    assert NetworkRecord.model_validate(net).croft.nics == {"a/b/c": {}}
    assert NetworkRecord.model_validate(net).dump() == net


def test_changing_the_meta_writes_only_what_changed() -> None:
    meta = InstanceMeta(member="m", state="creating", pool="p")
    assert meta.dump() == {"member": "m", "state": "creating", "pool": "p"}
    meta.state = "created"
    meta.rootfs = "/r"
    assert meta.dump() == {"member": "m", "state": "created", "pool": "p", "rootfs": "/r"}
    meta.renaming = "d"
    assert meta.dump(exclude={"renaming"}) == {
        "member": "m",
        "state": "created",
        "pool": "p",
        "rootfs": "/r",
    }


def test_a_record_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValidationError):
        InstanceRecord.model_validate({"name": "c", "config": {"limits.cpu": 2}})
    with pytest.raises(ValidationError):
        InstanceRecord.meta_of({"_croft": {"state": "half-done"}})
