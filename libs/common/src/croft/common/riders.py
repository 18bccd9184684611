"""Writes that ride along with another service's change.

An api operation whose work is one call to another service ends with a write of its own
(the operation's final state and its event). A `Rider` carries that write to the service,
which commits it in the transaction of its change: one transaction instead of two, and
the operation is reported done exactly when the change is recorded.

It is best effort. When the transaction fails its conditions (the operation record moved
on meanwhile: a cancel request, a progress update), the service writes its change alone
and reports the rider not written; the api then ends the operation itself, as it would
have without a rider.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from croft.common.errors import InvalidArgument
from croft.common.store import Create, Operation, Put, Update
from croft.v1 import common_pb2

# What a service lets ride along: operation records and events, nothing it owns.
RIDER_PREFIXES = ("/croft/operations/", "/croft/events/")

_KINDS = {
    Put: common_pb2.StoreWrite.PUT,
    Create: common_pb2.StoreWrite.CREATE,
    Update: common_pb2.StoreWrite.UPDATE,
}


@dataclass
class Rider:
    writes: Sequence[Operation]
    written: bool = False


def to_wire(writes: Iterable[Operation]) -> list[common_pb2.StoreWrite]:
    wire = []
    for op in writes:
        if not isinstance(op, Put | Create | Update):
            raise InvalidArgument(f"a {type(op).__name__} cannot ride along")
        wire.append(
            common_pb2.StoreWrite(
                kind=_KINDS[type(op)],
                key=op.key,
                value=bytes(op.value),
                revision=op.revision if isinstance(op, Update) else 0,
                lease=op.lease,
            )
        )
    return wire


def from_wire(wire: Iterable[common_pb2.StoreWrite]) -> Rider | None:
    """The rider of a request; None when it has none. InvalidArgument for a write outside
    `RIDER_PREFIXES` or an update without a revision."""
    writes: list[Operation] = []
    for write in wire:
        if not write.key.startswith(RIDER_PREFIXES):
            raise InvalidArgument(f"{write.key!r} may not ride along with a change")
        if write.kind == common_pb2.StoreWrite.CREATE:
            writes.append(Create(write.key, write.value, lease=write.lease))
        elif write.kind == common_pb2.StoreWrite.UPDATE:
            if write.revision <= 0:
                raise InvalidArgument(f"the update of {write.key!r} has no revision")
            writes.append(Update(write.key, write.value, write.revision, lease=write.lease))
        else:
            writes.append(Put(write.key, write.value, lease=write.lease))
    return Rider(writes) if writes else None
