"""Instance and snapshot records on the wire: the one place a model becomes its
`croft.v1.compute` message and back, for the compute client and compute's servicer.

A record crosses whole: the fields croft models, its `_croft`, and its `Shape` (the
fields croft does not model, as JSON, and which fields the record has, when not all), so
that `instance_from_wire(instance_to_wire(record)).dump() == record.dump()`. There is no
JSON on the way but for the rare fields croft does not model: a launch pays about what a
JSON round trip cost (tens of microseconds a record).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf.message import Message

from croft.common.models._base import Model
from croft.common.models.instance import InstanceRecord, SnapshotRecord
from croft.v1 import compute_pb2


def _scalars(message: type[Message]) -> tuple[str, ...]:
    """The names of a message's single scalar fields (no map, list or message)."""
    return tuple(
        field.name
        for field in message.DESCRIPTOR.fields
        if field.message_type is None and not field.is_repeated
    )


def _optional(message: type[Message]) -> tuple[str, ...]:
    """The names of the scalar fields of a message that may be absent (None in the model)."""
    return tuple(field.name for field in message.DESCRIPTOR.fields if field.has_presence)


_BODY = _scalars(compute_pb2.InstanceBody)
_INSTANCE = _scalars(compute_pb2.Instance)
_SNAPSHOT = _scalars(compute_pb2.InstanceSnapshot)
_INSTANCE_META = _scalars(compute_pb2.InstanceMeta)
_INSTANCE_META_OPTIONAL = _optional(compute_pb2.InstanceMeta)
_SNAPSHOT_META = _scalars(compute_pb2.SnapshotMeta)
_MAPS = ("config", "expanded_config")
_DEVICES = ("devices", "expanded_devices")
# The message of a record: an instance's or a snapshot's.
Wire = TypeVar("Wire", compute_pb2.Instance, compute_pb2.InstanceSnapshot)


def instance_to_wire(record: InstanceRecord) -> compute_pb2.Instance:
    return _filled(compute_pb2.Instance(), record, _INSTANCE, _INSTANCE_META)


def instance_from_wire(message: compute_pb2.Instance) -> InstanceRecord:
    values = _values_of(message, _INSTANCE, _INSTANCE_META, _INSTANCE_META_OPTIONAL)
    return InstanceRecord.model_validate(values)


def snapshot_to_wire(record: SnapshotRecord) -> compute_pb2.InstanceSnapshot:
    return _filled(compute_pb2.InstanceSnapshot(), record, _SNAPSHOT, _SNAPSHOT_META)


def snapshot_from_wire(message: compute_pb2.InstanceSnapshot) -> SnapshotRecord:
    return SnapshotRecord.model_validate(_values_of(message, _SNAPSHOT, _SNAPSHOT_META, ()))


def _plain(source: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The values of `names` in `source`, less those that are None (absent)."""
    return {name: value for name in names if (value := getattr(source, name)) is not None}


def _filled(
    message: Wire,
    record: InstanceRecord | SnapshotRecord,
    names: tuple[str, ...],
    meta_names: tuple[str, ...],
) -> Wire:
    """`message` filled from `record`: its own fields (`names`), the body an instance and
    a snapshot share, `_croft` (`meta_names`; when the record has one) and the shape.
    Filled in place: a message handed to another is copied."""
    for name, value in _plain(record, names).items():
        setattr(message, name, value)
    body = message.body
    for name, value in _plain(record, _BODY).items():
        setattr(body, name, value)
    body.profiles.extend(record.profiles)
    for name in _MAPS:
        getattr(body, name).update(getattr(record, name))
    for name in _DEVICES:
        devices = getattr(body, name)
        for device, keys in getattr(record, name).items():
            devices[device].keys.update(keys)
    if "croft" in record.model_fields_set:
        meta = record.croft
        for name, value in _plain(meta, meta_names).items():
            setattr(message.croft, name, value)
        _shape(message.croft.shape, meta)
    _shape(message.shape, record)
    return message


def _shape(shape: compute_pb2.Shape, model: Model) -> None:
    if model.model_extra:
        shape.extra = json.dumps(model.model_extra)
    present = model.model_fields_set
    if len(present) != len(type(model).model_fields):
        shape.fields.extend(present)


def _values_of(
    message: Wire,
    names: tuple[str, ...],
    meta_names: tuple[str, ...],
    meta_optional: tuple[str, ...],
) -> dict[str, Any]:
    """The model's values that `_filled` put in `message`."""
    body = message.body
    values = _plain(message, names)
    values.update(_plain(body, _BODY))
    values["profiles"] = list(body.profiles)
    for name in _MAPS:
        values[name] = dict(getattr(body, name))
    for name in _DEVICES:
        values[name] = {device: dict(wire.keys) for device, wire in getattr(body, name).items()}
    if message.HasField("croft"):
        wire = message.croft
        meta = _plain(wire, meta_names)
        for name in meta_optional:
            if not wire.HasField(name):
                meta[name] = None
        values["croft"] = _shaped(meta, wire.shape)
    return _shaped(values, message.shape)


def _shaped(values: dict[str, Any], shape: compute_pb2.Shape) -> dict[str, Any]:
    """`values` as the record had them: only the fields it had, and those croft does not
    model."""
    if shape.fields:
        values = {name: values[name] for name in shape.fields if name in values}
    if shape.extra:
        values.update(json.loads(shape.extra))
    return values
