"""Writes riding along with another service's change, against a real etcd."""

from __future__ import annotations

import pytest

from croft.common.errors import InvalidArgument, NotFound
from croft.common.records import modify
from croft.common.riders import Rider, from_wire, to_wire
from croft.common.store import Create, Delete, Put, Update, dump
from croft.common.store.etcd import EtcdStore
from croft.v1 import common_pb2


async def _record(store: EtcdStore, key: str, value: dict) -> int:
    return (await store.put(key, dump(value))).revision


def _done(record: dict) -> dict:
    return {**record, "done": True}


async def test_a_rider_goes_in_the_transaction_of_the_change(
    store: EtcdStore, key_prefix: str
) -> None:
    key, ending = key_prefix + "instance", key_prefix + "operation"
    await _record(store, key, {"done": False})
    op_revision = await _record(store, ending, {"status": "Running"})
    rider = Rider([Update(ending, dump({"status": "Success"}), op_revision)])
    assert await modify(store, key, _done, missing="gone", rider=rider) == {"done": True}
    assert rider.written
    change, end = await store.get(key), await store.get(ending)
    assert change is not None and end is not None
    assert change.revision == end.revision  # one transaction
    assert end.json() == {"status": "Success"}


@pytest.mark.parametrize("spoil", ["moved on", "gone", "lease expired"])
async def test_a_rider_that_cannot_go_is_dropped_and_the_change_goes_alone(
    store: EtcdStore, key_prefix: str, spoil: str
) -> None:
    key, ending = key_prefix + "instance", key_prefix + "operation"
    await _record(store, key, {"done": False})
    op_revision = await _record(store, ending, {"status": "Running"})
    lease = 0
    if spoil == "moved on":
        await _record(store, ending, {"status": "Running", "metadata": "newer"})
    elif spoil == "gone":
        await store.delete(ending)
    else:
        granted = await store.grant_lease(5)
        await store.revoke_lease(granted)
        lease = granted.id
    rider = Rider([Update(ending, dump({"status": "Success"}), op_revision, lease=lease)])
    assert await modify(store, key, _done, missing="gone", rider=rider) == {"done": True}
    assert not rider.written
    found = await store.get_json(key)
    assert found is not None and found[0] == {"done": True}
    left = await store.get_json(ending)
    if spoil == "gone":
        assert left is None
    else:
        assert left is not None and left[0]["status"] == "Running"  # not touched


async def test_a_missing_record_is_still_not_found_with_a_rider(
    store: EtcdStore, key_prefix: str
) -> None:
    rider = Rider([Put(key_prefix + "operation", b"{}")])
    with pytest.raises(NotFound, match="Instance not found"):
        await modify(store, key_prefix + "none", _done, missing="Instance not found", rider=rider)
    assert not rider.written
    assert await store.get(key_prefix + "operation") is None


def test_riders_cross_the_wire_and_only_to_operations_and_events() -> None:
    writes = [
        Create("/croft/operations/a", b"1", lease=7),
        Update("/croft/operations/a", b"2", 42),
        Put("/croft/events/b", b"3", lease=9),
    ]
    back = from_wire(to_wire(writes))
    assert back is not None and list(back.writes) == writes and not back.written
    assert from_wire([]) is None
    with pytest.raises(InvalidArgument, match="may not ride along"):
        from_wire([common_pb2.StoreWrite(key="/croft/records/instances/default/c1", value=b"")])
    with pytest.raises(InvalidArgument, match="has no revision"):
        from_wire(
            [common_pb2.StoreWrite(kind=common_pb2.StoreWrite.UPDATE, key="/croft/operations/a")]
        )
    with pytest.raises(InvalidArgument, match="cannot ride along"):
        to_wire([Delete("/croft/operations/a")])
