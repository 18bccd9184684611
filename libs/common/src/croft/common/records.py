"""Where records live in the store, shared by every service.

`/croft/records/<kind>/<project>/<name>` holds one JSON record in LXD's API shape (projects
themselves are `/croft/records/projects/<name>`; pools and networks, which LXD does not
scope by project, use the project `default`). Keys starting with `_` inside a record
are croft's own bookkeeping and never leave the api.

The instance NICs plugged into a managed network are one key each,
`/croft/records/network-nics/<network>/<project>/<instance>/<device>`, not a list inside
the network's record: attaching the thousandth NIC writes as little as the first, and no
network record grows with the instances on it. A network's `used_by` is read from them.
"""

from __future__ import annotations

import marshal
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from croft.common.errors import Conflict, InvalidArgument, NotFound
from croft.common.riders import Rider
from croft.common.store import Create, Operation, Store, Update, dump

RECORDS = "/croft/records/"
DEFAULT_PROJECT = "default"

# The kinds of record under RECORDS (`croft.common.models` has a model for each).
INSTANCES = "instances"
INSTANCE_SNAPSHOTS = "instance-snapshots"
INSTANCE_BACKUPS = "instance-backups"
STORAGE_POOLS = "storage-pools"
STORAGE_VOLUMES = "storage-volumes"
STORAGE_VOLUME_BACKUPS = "storage-volume-backups"
NETWORKS = "networks"
IMAGES = "images"
IMAGE_ALIASES = "image-aliases"
PROFILES = "profiles"


def record_prefix(kind: str, project: str) -> str:
    return f"{RECORDS}{kind}/{project}/"


def record_key(kind: str, project: str, name: str) -> str:
    return f"{RECORDS}{kind}/{project}/{name}"


def project_key(name: str) -> str:
    return f"{RECORDS}projects/{name}"


def network_nic_prefix(network: str) -> str:
    """Where the NICs attached to a managed network are recorded."""
    return f"{RECORDS}network-nics/{network}/"


def network_nic_key(network: str, project: str, instance: str, device: str) -> str:
    return f"{network_nic_prefix(network)}{project}/{instance}/{device}"


def network_member_prefix(network: str) -> str:
    """Where each member's state and member-specific config of a managed network are
    recorded (LXD's `networks_nodes` rows and their `networks_config` with a node_id)."""
    return f"{RECORDS}network-members/{network}/"


def network_member_key(network: str, member: str) -> str:
    return f"{network_member_prefix(network)}{member}"


def instance_url(project: str, instance: str) -> str:
    """An instance as LXD names it in `used_by`."""
    url = f"/1.0/instances/{instance}"
    return url if project == DEFAULT_PROJECT else f"{url}?project={project}"


def network_used_by(network: str, nic_keys: Iterable[str]) -> list[str]:
    """A network's `used_by`, from the keys of the NICs attached to it."""
    prefix = network_nic_prefix(network)
    urls = set()
    for key in nic_keys:
        project, instance, _ = key.removeprefix(prefix).split("/", 2)
        urls.add(instance_url(project, instance))
    return sorted(urls)


def _create(key: str, record: dict[str, Any]) -> Operation:
    return Create(key, dump(record))


_JsonT = TypeVar("_JsonT")


def copy_record(record: _JsonT) -> _JsonT:
    """A deep copy of JSON-shaped data (dicts, lists, strings, numbers, booleans, None):
    marshal's round trip, ~4x cheaper than copy.deepcopy for a record."""
    # marshal's types stop at its own union; a record is within it (JSON-shaped), and its
    # copy has the record's own type.
    value: Any = record
    copied: _JsonT = marshal.loads(marshal.dumps(value))
    return copied


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The record without croft's private `_` keys, as clients see it."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


async def modify(
    store: Store,
    key: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    missing: str,
    default: dict[str, Any] | None = None,
    current: tuple[dict[str, Any], int] | None = None,
    also: Sequence[Operation] = (),
    rider: Rider | None = None,
) -> dict[str, Any]:
    """`modify_entry`, for the record alone."""
    new, _ = await modify_entry(
        store,
        key,
        change,
        missing=missing,
        default=default,
        current=current,
        also=also,
        rider=rider,
    )
    return new


async def modify_entry(
    store: Store,
    key: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    missing: str,
    default: dict[str, Any] | None = None,
    current: tuple[dict[str, Any], int] | None = None,
    also: Sequence[Operation] = (),
    rider: Rider | None = None,
) -> tuple[dict[str, Any], int]:
    """Read-modify-write of one record under compare-and-swap, retried when another writer
    got in between. `change` gets the current record and returns the new one (it may raise
    to refuse, and is re-run on a retry). A missing record is NotFound(`missing`), or
    starts from `default` when one is given.

    `current` is the record and revision the caller just read, when it has them: the
    first attempt then writes without reading again. `also` are writes that go in the
    same transaction as the record's (an event about the change, say). `rider`'s writes
    go in too, unless the transaction fails with them (`croft.common.riders`): the change
    is then retried without them, and `rider.written` stays False. Returns the record
    written and its revision."""
    riding: Sequence[Operation] = rider.writes if rider is not None else ()
    for _ in range(20):
        if current is not None:
            record, revision = copy_record(current[0]), current[1]
            current = None
        else:
            found = await store.get(key)
            if found is None:
                if default is None:
                    raise NotFound(missing)
                record, revision = copy_record(default), 0
            else:
                record, revision = found.json(), found.revision
        new = change(record)
        write = Update(key, dump(new), revision) if revision else _create(key, new)
        try:
            written = await store.transaction([write, *also, *riding])
        except (Conflict, NotFound, InvalidArgument) as exc:
            if riding:
                # The rider's own conditions may be what failed (its record moved on, its
                # lease expired): the change goes alone, on a fresh read.
                riding = ()
                continue
            if isinstance(exc, Conflict):
                continue  # another writer got in between
            if isinstance(exc, NotFound) and revision:
                if default is None:
                    raise NotFound(missing) from None
                continue
            raise
        if rider is not None and riding:
            rider.written = True
        return new, written
    raise Conflict(f"{key} is changing too fast to be updated; try again")
