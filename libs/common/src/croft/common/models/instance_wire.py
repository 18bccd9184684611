"""Instance and snapshot records on the wire: the one place a model becomes its
`croft.v1.compute` message and back, for the compute client and compute's servicer.

A record crosses whole: the fields croft models, its `_croft`, the fields it does not
(as JSON in `extra`) and which fields the record has (`fields`, when not all), so that
`instance_from_wire(instance_to_wire(record)).dump() == record.dump()`. No JSON on the
way but the rare fields croft does not model: a launch pays about what a JSON round trip
cost (tens of microseconds a record).
"""

from __future__ import annotations

import json
from typing import Any

from croft.common.models._base import Model
from croft.common.models.instance import InstanceRecord, SnapshotRecord
from croft.v1 import compute_pb2

# The fields an instance and its snapshots share, by kind: scalars are copied, string
# maps and lists copied into dicts and lists, devices and `_croft` converted apart.
_SCALARS = ("name", "description", "architecture", "ephemeral", "stateful", "created_at")
_MAPS = ("config", "expanded_config")
_DEVICES = ("devices", "expanded_devices")
_INSTANCE = (*_SCALARS, "last_used_at", "project", "type", "location", "status", "status_code")
_SNAPSHOT = (*_SCALARS, "last_used_at", "expires_at", "size")
_INSTANCE_META = ("member", "pool", "rootfs", "instance_mounts")
_INSTANCE_META_OPTIONAL = ("state", "volume", "definition", "renaming")


def instance_to_wire(record: InstanceRecord) -> compute_pb2.Instance:
    message = compute_pb2.Instance(**_body_to_wire(record, _INSTANCE))
    if "croft" in record.model_fields_set:
        meta = record.croft
        message.croft.CopyFrom(
            compute_pb2.InstanceMeta(
                **_plain(meta, _INSTANCE_META),
                **{k: v for k in _INSTANCE_META_OPTIONAL if (v := getattr(meta, k)) is not None},
            )
        )
        _keep_shape(meta, message.croft)
    _keep_shape(record, message)
    return message


def instance_from_wire(message: compute_pb2.Instance) -> InstanceRecord:
    values = _body_of(message, _INSTANCE)
    if message.HasField("croft"):
        wire = message.croft
        meta = _plain(wire, _INSTANCE_META)
        for name in _INSTANCE_META_OPTIONAL:
            meta[name] = getattr(wire, name) if wire.HasField(name) else None
        values["croft"] = _shaped(meta, wire)
    return InstanceRecord.model_validate(_shaped(values, message))


def snapshot_to_wire(record: SnapshotRecord) -> compute_pb2.InstanceSnapshot:
    message = compute_pb2.InstanceSnapshot(**_body_to_wire(record, _SNAPSHOT))
    if "croft" in record.model_fields_set:
        message.croft.CopyFrom(
            compute_pb2.SnapshotMeta(member=record.croft.member, pool=record.croft.pool)
        )
        _keep_shape(record.croft, message.croft)
    _keep_shape(record, message)
    return message


def snapshot_from_wire(message: compute_pb2.InstanceSnapshot) -> SnapshotRecord:
    values = _body_of(message, _SNAPSHOT)
    if message.HasField("croft"):
        wire = message.croft
        values["croft"] = _shaped({"member": wire.member, "pool": wire.pool}, wire)
    return SnapshotRecord.model_validate(_shaped(values, message))


def _plain(source: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(source, name) for name in names}


def _body_to_wire(
    record: InstanceRecord | SnapshotRecord, names: tuple[str, ...]
) -> dict[str, Any]:
    """The keyword arguments of a record's message: its plain fields, maps and devices."""
    values = _plain(record, names)
    values["profiles"] = record.profiles
    for name in _MAPS:
        values[name] = getattr(record, name)
    for name in _DEVICES:
        values[name] = {
            device: compute_pb2.Device(keys=keys) for device, keys in getattr(record, name).items()
        }
    return values


def _body_of(
    message: compute_pb2.Instance | compute_pb2.InstanceSnapshot, names: tuple[str, ...]
) -> dict[str, Any]:
    """What `_body_to_wire` put in `message`, as the model's field values."""
    values = _plain(message, names)
    values["profiles"] = list(message.profiles)
    for name in _MAPS:
        values[name] = dict(getattr(message, name))
    for name in _DEVICES:
        values[name] = {device: dict(wire.keys) for device, wire in getattr(message, name).items()}
    return values


def _keep_shape(model: Model, message: Any) -> None:
    """What a message needs besides the fields' values to make `model` again: the fields
    it does not model and, when it does not have them all, which it has."""
    if model.model_extra:
        message.extra = json.dumps(model.model_extra)
    present = model.model_fields_set
    if len(present) != len(type(model).model_fields):
        message.fields.extend(present)


def _shaped(values: dict[str, Any], message: Any) -> dict[str, Any]:
    """`values` read from `message` as `_keep_shape` says the record had them: only the
    fields it had, and the ones croft does not model."""
    if message.fields:
        values = {name: values[name] for name in message.fields if name in values}
    if message.extra:
        values.update(json.loads(message.extra))
    return values
