"""The typed record models (`croft.common.models`) against the records a real croft
writes: a launch, a snapshot, an image with an alias, a profile, the default pool,
network and project. Every record of every kind validates with its model, is stored at
the key the model computes, and comes back from `dump()` exactly as it was read;
`public()` is what the api would show.

`CROFT_CAPTURE_RECORDS=<file>` also writes the records read to `<file>`: that is how
`libs/common/tests/fixtures/records.json` was captured."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from croft.common import records
from croft.common.models import (
    MODELS,
    ImageRecord,
    InstanceRecord,
    NetworkMember,
    NetworkNic,
    OperationRecord,
    Record,
    SnapshotRecord,
    StoragePoolRecord,
    StorageVolumeRecord,
)
from croft.common.models.operation import OPERATIONS

from .conftest import Croft, Lxc
from .test_faults import store_list


def expected_key(kind: str, key: str, model: Any) -> str:
    """The key the model computes for a record, from what the key says the model cannot
    know (the project of an image or profile, the instance of a snapshot)."""
    rest = key.removeprefix(records.RECORDS + kind + "/")
    if kind == "instance-snapshots":
        project, instance, snapshot = rest.split("/")
        return SnapshotRecord.store_key(project, instance, snapshot)
    if kind == "network-nics":
        network, project, instance, device = rest.split("/")
        return NetworkNic.store_key(network, project, instance, device)
    if kind == "network-members":
        network, member = rest.split("/")
        return NetworkMember.store_key(network, member)
    if kind in ("images", "image-aliases", "profiles"):
        return str(model.key(rest.split("/")[0]))
    return str(model.key())


@pytest.fixture(scope="module")
def launched(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> list[tuple[str, Any]]:
    """Every record (and operation) of a croft after a launch, a snapshot, an image with
    an alias and a profile."""
    croft, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("profile", "create", "extra")
    lxc("profile", "set", "extra", "limits.memory", "64MiB")
    lxc("launch", "busybox", "c1", "--profile", "default", "--profile", "extra")
    lxc("snapshot", "c1", "snap0")
    found = store_list(croft, records.RECORDS) + store_list(croft, OPERATIONS)
    capture = os.environ.get("CROFT_CAPTURE_RECORDS")
    if capture:
        Path(capture).write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    return found


def test_every_record_a_real_croft_writes_round_trips(launched: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, raw in launched:
        if key.startswith(OPERATIONS):
            operation = OperationRecord.model_validate(raw)
            assert operation.key() == key
            assert operation.dump() == raw
            assert operation.public() == raw["operation"]
            continue
        kind = key.removeprefix(records.RECORDS).split("/")[0]
        if kind not in MODELS:
            continue  # instance logs: not records
        model = MODELS[kind].model_validate(raw)
        seen.add(kind)
        assert expected_key(kind, key, model) == key
        assert model.dump() == raw, key
        if isinstance(model, Record):
            assert model.public() == records.public(raw), key
    assert seen == set(MODELS)


def test_the_typed_reads_say_what_the_records_hold(launched: list[tuple[str, Any]]) -> None:
    by_key = dict(launched)
    instance = InstanceRecord.model_validate(by_key[InstanceRecord.store_key("default", "c1")])
    assert instance.croft.state == "created"
    assert instance.croft.pool == "default"
    assert instance.croft.rootfs and instance.croft.definition
    assert instance.croft.member == instance.location
    assert "_croft" not in instance.public()
    assert instance.public()["expanded_config"]["limits.memory"] == "64MiB"
    snapshot = SnapshotRecord.model_validate(
        by_key[SnapshotRecord.store_key("default", "c1", "snap0")]
    )
    assert snapshot.croft.pool == "default"
    pool = StoragePoolRecord.model_validate(by_key[StoragePoolRecord.store_key("default")])
    (member,) = pool.croft.members.values()
    assert member.state == "created" and member.config["source"]
    volume = StorageVolumeRecord.model_validate(
        by_key[StorageVolumeRecord.store_key("default", "container", "c1")]
    )
    assert volume.croft.volume == "c1" and volume.croft.state is None
    image = ImageRecord.model_validate(
        next(raw for key, raw in launched if key.startswith(records.RECORDS + "images/"))
    )
    assert image.croft.member and image.public()["public"] is False
