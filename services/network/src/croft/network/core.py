"""The network core: network records in the store, the driver calls that make them real on
this host, and the instance NICs plugged into them.

The core is the only writer of network records, shaped for a cluster as LXD keeps them
(its `networks`, `networks_nodes` and `networks_config` tables): one cluster-wide record
per network (`/croft/records/networks/default/<name>`: LXD's network object, its
cluster-wide config, `status` and `locations`), and one key per member that has the
network (`croft.common.records.network_member_key`) with that member's state (`pending`,
`created`, `errored`) and its member-specific config (LXD's member-specific keys such as
`bridge.external_interfaces` and `parent`). A member's network service writes only its
own member key, and the record's `status`/`locations` with it. A driver sees the merged
config. Records written before this shape (owned by one `_croft.member`, member keys in
the config) are moved to it when their member's service starts.

Each instance NIC attached to a network is a key of its own
(`croft.common.records.network_nic_key`), written by the same service: an attach or
detach writes that key alone, whatever the number of instances on the network, and never
the network's record. `used_by` is read from those keys. Driver work on a network runs
under that network's lock (the driver runs its blocking work in a worker thread itself),
and is shielded from the caller going away: an attach either completes (and the caller's
cleanup detaches it) or undoes itself.

Service restarts never disturb a running network: `start()` converges every network of
this member with the driver's idempotent `start`, which adopts the running dnsmasq and
keeps the bridge (instances are plugged into it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from croft.common import events
from croft.common.blocking import in_thread
from croft.common.errors import (
    Conflict,
    CroftError,
    InvalidArgument,
    NotFound,
    NotImplementedYet,
)
from croft.common.locks import KeyedLock
from croft.common.models import NetworkMember, NetworkMeta, NetworkNic, NetworkRecord
from croft.common.network_acl import (
    Acl,
    NetworkAclPolicy,
    acl_prefix,
    check_acls_exist,
    network_policy,
)
from croft.common.network_forward import Forward, forward_prefix
from croft.common.records import (
    DEFAULT_PROJECT,
    RECORDS,
    modify,
    network_member_key,
    network_member_prefix,
    network_nic_key,
    network_nic_prefix,
    record_prefix,
)
from croft.common.revert import Reverter
from croft.common.service import ServiceContext
from croft.common.store import Create, Delete, Entry, Operation, Put, Update, dump
from croft.network.drivers import (
    DriverSettings,
    NetworkDriver,
    NetworkInfo,
    NetworkSecurity,
    NicFilter,
    load_driver,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_NETWORK_TYPE = "bridge"


def network_key(name: str) -> str:
    """Where a network's record lives (networks are not scoped by project, as in LXD)."""
    return NetworkRecord.store_key(name)


# LXD's member-specific network keys (db.NodeSpecificNetworkConfig): each member keeps
# its own value, in its member key, never in the cluster-wide record.
MEMBER_SPECIFIC_KEYS = frozenset({"bridge.external_interfaces", "parent"})

# A member's state of a network, as LXD's networks_nodes.state.
PENDING, CREATED, ERRORED = "pending", "created", "errored"


def split_config(config: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A network's config as (cluster-wide keys, member-specific keys)."""
    cluster = {k: v for k, v in config.items() if k not in MEMBER_SPECIFIC_KEYS}
    member = {k: v for k, v in config.items() if k in MEMBER_SPECIFIC_KEYS}
    return cluster, member


def new_network_record(
    name: str, type_name: str, config: dict[str, str], description: str = ""
) -> NetworkRecord:
    """A managed network's cluster-wide record in LXD's `GET /1.0/networks/<name>`
    shape (its member-specific keys are left out: they go in member keys)."""
    # Every field named: the stored record has them all (`dump()` leaves out unset ones).
    return NetworkRecord(
        name=name,
        description=description,
        type=type_name,
        managed=True,
        status="Created",
        config=split_config(config)[0],
        used_by=[],
        locations=["none"],
        _croft=NetworkMeta(),  # by its alias: the name mypy knows
    )


def member_entry(state: str, config: Mapping[str, str], error: str = "") -> NetworkMember:
    """One member's state of a network and its member-specific config."""
    return NetworkMember(state=state, config=split_config(config)[1], error=error)


def with_members(record: NetworkRecord, states: Mapping[str, str]) -> NetworkRecord:
    """The record with `status` and `locations` as LXD derives them from the members'
    states (`states`: member -> state): Errored if one errored, Pending if one is
    pending, else Created; `locations` lists the members, or is LXD's ["none"] while
    only one member has the network (as on a server that is not clustered)."""
    values = set(states.values())
    status = "Errored" if ERRORED in values else "Pending" if PENDING in values else "Created"
    locations = sorted(states) if len(states) > 1 else ["none"]
    return record.model_copy(update={"status": status, "locations": locations})


def _with_config(record: NetworkRecord, config: dict[str, str]) -> NetworkRecord:
    return record.model_copy(update={"config": config})


# A project name that can be a DNS label (LXD's project names are freer).
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class InstanceNic:
    """One NIC of an instance on a managed network."""

    network: str
    project: str
    instance: str
    device: str
    hwaddr: str = ""  # "" on detach: the one recorded at attach is used
    ipv4: str | None = None  # a pinned address; None for any
    ipv6: str | None = None  # a pinned DHCPv6 address; None for any
    host_name: str = ""  # the NIC's host-side interface, when known
    filters: tuple[str, ...] = ()  # "mac", "ipv4", "ipv6": LXD's security.*_filtering
    acls: str = ""  # the NIC's own `security.acls` (OVN's; a bridged NIC has none)
    # All its `security.acls*` keys (the ACLs and their default actions).
    acl_config: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The NIC's name among its network's NICs."""
        return f"{self.project}/{self.instance}/{self.device}"

    @property
    def store_key(self) -> str:
        return network_nic_key(self.network, self.project, self.instance, self.device)

    @property
    def dns_name(self) -> str:
        """The instance's name in the network's DHCP and DNS, as LXD's project.DNS makes
        it: `<instance>.<project>` outside the default project, so that two projects'
        instances of one name do not share it (the instance's own name when the project's
        name cannot be a DNS label)."""
        if self.project in ("", DEFAULT_PROJECT) or not _DNS_LABEL.match(self.project):
            return self.instance
        return f"{self.instance}.{self.project}"


@dataclass(frozen=True)
class NicAttachment:
    """What compute needs to plug a NIC in."""

    nic_type: str  # LXD's nictype, as the network's driver plugs NICs: "bridged"...
    parent: str  # the host interface the NIC hangs off (the bridge for "bridged")
    mtu: int | None  # None: the NIC keeps its default
    ipv4: str | None  # the pinned address, if one was asked for


class NetworkCore:
    def __init__(self, context: ServiceContext) -> None:
        self.context = context
        self.store = context.store
        self.member = context.config.member
        self.default_network = context.config.network.default_bridge
        self.settings = DriverSettings(
            state_root=context.config.networks_dir,
            nft_table=context.config.network.nft_table,
            ovn_root=context.config.state_dir / "ovn",
            member=self.member,
            networks=self._member_networks,
        )
        self._drivers: dict[str, NetworkDriver] = {}
        self._locks: KeyedLock[str] = KeyedLock()
        # What a NIC's attach or detach reads, kept instead of read from the store each
        # time (this service is the only writer of both): the records of this member's
        # networks, dropped by every change of a network, and each network's NICs with
        # their revisions (a compare-and-swap still catches any other writer's change).
        self._records: dict[str, NetworkRecord] = {}
        self._nics: dict[str, dict[str, tuple[NetworkNic, int]]] = {}

    # ------------------------------------------------------------------ plumbing

    def driver(self, type_name: str) -> NetworkDriver:
        """The (one) driver of a network type; InvalidArgument for an unknown type."""
        if type_name not in self._drivers:
            try:
                self._drivers[type_name] = load_driver(type_name, self.settings)
            except InvalidArgument:
                raise InvalidArgument("Unknown driver") from None
        return self._drivers[type_name]

    async def _member_networks(self) -> dict[str, NetworkInfo]:
        """Every network this member has, with its merged config (what a driver built
        on another network, OVN on its uplink, reads)."""
        mine = {
            entry.key.removeprefix(RECORDS + "network-members/").split("/")[0]: (
                NetworkMember.model_validate(entry.json())
            )
            for entry in await self.store.list(RECORDS + "network-members/")
            if entry.key.endswith(f"/{self.member}")
        }
        found = {}
        for entry in await self.store.list(record_prefix("networks", DEFAULT_PROJECT)):
            record = NetworkRecord.model_validate(entry.json())
            member = mine.get(record.name)
            if member is not None:
                config = {**record.config, **member.config}
                found[record.name] = NetworkInfo(record.name, record.type, config)
        return found

    async def _locked(self, name: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` under the network's lock: driver work and record changes of one
        network go one at a time in this process."""

        async def run() -> T:
            async with self._locks.hold(name):
                return await work()

        # Shielded: a caller that goes away (a cancelled gRPC call) must not stop driver
        # work half-way; the work finishes, or undoes itself, under the lock.
        return await asyncio.shield(run())

    async def _local_record(self, name: str) -> NetworkRecord:
        """The record of a network this member has, its config merged with this member's
        member-specific config (what its driver works with)."""
        record, _, mine, _ = await self._local_entry(name)
        return _with_config(record, {**record.config, **mine.config})

    async def _local_entry(self, name: str) -> tuple[NetworkRecord, int, NetworkMember, int]:
        """The cluster-wide record of a network this member has and its revision, then
        this member's key of it and its revision."""
        if not name:
            raise InvalidArgument("No network name given")
        record, revision = await self._require(name)
        mine = await self.store.get_json(network_member_key(name, self.member))
        if mine is None:
            raise NotFound(f"Network {name!r} is not set up on member {self.member!r}")
        return record, revision, NetworkMember.model_validate(mine[0]), mine[1]

    async def _member_states(self, name: str) -> dict[str, str]:
        """Every member's state of a network."""
        prefix = network_member_prefix(name)
        return {
            entry.key.removeprefix(prefix): NetworkMember.model_validate(entry.json()).state
            for entry in await self.store.list(prefix)
        }

    def _forget(self, name: str) -> None:
        """Drop what is kept of a network: read it from the store next time."""
        self._records.pop(name, None)
        self._nics.pop(name, None)

    async def _nic_entries(self, name: str) -> dict[str, tuple[NetworkNic, int]]:
        """The NICs attached to a network, by `InstanceNic.key`, with their revisions."""
        known = self._nics.get(name)
        if known is None:
            prefix = network_nic_prefix(name)
            known = {
                entry.key.removeprefix(prefix): (
                    NetworkNic.model_validate(entry.json()),
                    entry.revision,
                )
                for entry in await self.store.list(prefix)
            }
            self._nics[name] = known
        return known

    async def _lifecycle(self, action: str, name: str) -> None:
        with contextlib.suppress(CroftError):
            await events.publish(
                self.store,
                "lifecycle",
                events.lifecycle_metadata(action, f"/1.0/networks/{name}"),
            )

    # ------------------------------------------------------------------ service start

    async def start(self) -> None:
        """At service start: move this member's records written before the cluster shape
        to it, make the default network (or join it, when another member made it), then
        bring every network of this member up (adopting what already runs). A network
        that fails is logged and left for the next start or attach; the service still
        comes up for the others."""
        await self.migrate_records()
        if self.default_network:
            try:
                await self.ensure_default_network()
            except Exception as exc:  # noqa: BLE001 (the other networks must still come up)
                log.error("default network %s not created: %s", self.default_network, exc)
        await self.start_networks()

    @property
    def _default_made_marker(self) -> Path:
        return self.settings.state_root / ".default-network-created"

    async def ensure_default_network(self) -> NetworkRecord | None:
        """The default bridge's record, created (with a free subnet chosen by the driver)
        the first time. Host state left by a service killed between the driver's create
        and the record's write is adopted, so its subnet does not change. When another
        member recorded it first, this member joins it (its own member state, the
        record's config). A default network the user deleted stays deleted (None), as
        in LXD."""
        name = self.default_network
        key = network_key(name)

        async def ensure() -> NetworkRecord | None:
            self._forget(name)
            found = await self.store.get_json(key)
            if found is not None:
                if await self.store.get(network_member_key(name, self.member)) is not None:
                    return await self._local_record(name)
                return await self._join(name, NetworkRecord.model_validate(found[0]).type)
            driver = self.driver(DEFAULT_NETWORK_TYPE)
            adopted = await driver.local_config(name)
            if adopted is None and await in_thread(self._default_made_marker.exists):
                return None
            if adopted is not None:
                config = adopted
            else:
                config = await driver.create(name, {})
            record = new_network_record(name, DEFAULT_NETWORK_TYPE, config)
            try:
                await self.store.transaction(
                    [
                        Create(key, dump(record.dump())),
                        Put(
                            network_member_key(name, self.member),
                            dump(member_entry(CREATED, config).dump()),
                        ),
                    ]
                )
            except Conflict:
                # Another member recorded it first: its config wins, and this member
                # joins it. Host state made just now with a subnet of its own goes.
                if adopted is None:
                    await driver.delete(name)
                return await self._join(name, DEFAULT_NETWORK_TYPE)
            except BaseException:
                if adopted is None:
                    await driver.delete(name)
                raise
            await in_thread(self._default_made_marker.touch)
            how = "adopted" if adopted is not None else "created"
            log.info("%s the default network %s (%s)", how, name, config.get("ipv4.address"))
            await self._lifecycle("network-created", name)
            return record

        return await self._locked(name, ensure)

    async def _join(self, name: str, type_name: str) -> NetworkRecord:
        """Set up on this member a network another member recorded: pending while its
        host state is made from the record's config, then created (errored, with the
        error, if the driver fails). The caller holds the network's lock."""
        driver = self.driver(type_name)
        await self._set_member_state(name, PENDING, {})
        try:
            record = (await self._require(name))[0]
            if await driver.local_config(name) is None:
                await driver.create(name, record.config)
        except Exception as exc:
            with contextlib.suppress(CroftError):
                await self._set_member_state(name, ERRORED, {}, error=str(exc))
            raise
        await self._set_member_state(name, CREATED, {})
        log.info("joined network %s, recorded by another member", name)
        return await self._local_record(name)

    async def _require(self, name: str) -> tuple[NetworkRecord, int]:
        """A network's cluster-wide record and its revision."""
        found = await self.store.get_json(network_key(name))
        if found is None:
            raise NotFound("Network not found")
        return NetworkRecord.model_validate(found[0]), found[1]

    async def _set_member_state(
        self, name: str, state: str, config: Mapping[str, str], error: str = ""
    ) -> NetworkRecord:
        """Write this member's state (and member-specific config) of a network, and the
        record's status and locations that follow from every member's, in one
        transaction (read again and retried should another member write meanwhile)."""
        for _ in range(5):
            record, revision = await self._require(name)
            states = {**await self._member_states(name), self.member: state}
            new = with_members(record, states)
            try:
                await self.store.transaction(
                    [
                        Update(network_key(name), dump(new.dump()), revision),
                        Put(
                            network_member_key(name, self.member),
                            dump(member_entry(state, config, error).dump()),
                        ),
                    ]
                )
            except Conflict:
                continue
            self._forget(name)
            return new
        raise Conflict(f"network {name} kept changing while this member's state was written")

    async def migrate_records(self) -> None:
        """Move this member's network records written before the cluster shape (one
        owner in `_croft.member`, member-specific keys in the config) to it: the record
        keeps the cluster-wide part, this member's key gets its state (created) and its
        member-specific keys. Each record moves in one transaction; other members'
        records are left to them."""
        for entry in await self.store.list(record_prefix("networks", DEFAULT_PROJECT)):
            record = NetworkRecord.model_validate(entry.json())
            if record.croft.member != self.member:
                continue
            name = record.name

            async def migrate(
                entry: Entry = entry, record: NetworkRecord = record, name: str = name
            ) -> None:
                cluster, _ = split_config(record.config)
                croft = NetworkMeta.model_validate(record.croft.dump(exclude={"member"}))
                states = {**await self._member_states(name), self.member: CREATED}
                moved = record.model_copy(update={"config": cluster, "croft": croft})
                new = with_members(moved, states)
                await self.store.transaction(
                    [
                        Update(entry.key, dump(new.dump()), entry.revision),
                        Put(
                            network_member_key(name, self.member),
                            dump(member_entry(CREATED, record.config).dump()),
                        ),
                    ]
                )
                self._forget(name)
                log.info("network %s: record moved to the cluster shape", name)

            try:
                await self._locked(name, migrate)
            except CroftError as exc:
                log.error("network %s: record not moved to the cluster shape: %s", name, exc)

    async def start_networks(self) -> list[str]:
        """Start every network this member has; returns the names that failed. A
        network that fails is marked errored for this member, one that starts again
        created."""
        failed = []
        mine = {
            entry.key.removeprefix(RECORDS + "network-members/").split("/")[0]: (
                NetworkMember.model_validate(entry.json())
            )
            for entry in await self.store.list(RECORDS + "network-members/")
            if entry.key.endswith(f"/{self.member}")
        }
        for entry in await self.store.list(record_prefix("networks", DEFAULT_PROJECT)):
            record = NetworkRecord.model_validate(entry.json())
            name = record.name
            member = mine.get(name)
            if member is None:
                continue
            if member.state == PENDING and record.status == "Pending":
                # A create this service was killed in: it never finished, so none of it
                # stays (LXD's failed create leaves no network either).
                try:
                    await self._locked(name, functools.partial(self._abandon_create, record))
                except CroftError as exc:
                    log.error("network %s: unfinished create not undone: %s", name, exc)
                continue
            if record.croft.nics:
                try:
                    await self._locked(name, functools.partial(self._move_nics_out, entry))
                except CroftError as exc:
                    log.error("network %s: its NICs were not moved to keys: %s", name, exc)
            config = {**record.config, **member.config}

            async def start(
                record: NetworkRecord = record,
                config: dict[str, str] = config,
                member: NetworkMember = member,
            ) -> None:
                driver = self.driver(record.type)
                try:
                    await driver.start(record.name, config)
                    # ACLs or forwards changed while this service was down apply now.
                    await driver.apply_security(
                        record.name, await self._security(record.name, driver, config, check=False)
                    )
                except Exception as exc:
                    with contextlib.suppress(CroftError):
                        await self._set_member_state(record.name, ERRORED, config, error=str(exc))
                    raise
                if member.state != CREATED:
                    await self._set_member_state(record.name, CREATED, config)

            try:
                await self._locked(name, start)
            except Exception as exc:  # noqa: BLE001 (one broken network must not stop the rest)
                log.error("network %s did not start: %s", name, exc)
                failed.append(name)
        return failed

    async def _abandon_create(self, record: NetworkRecord) -> None:
        """Undo a create that never finished: the driver's host state (only if the
        driver made some: an interface of that name it did not make stays), then the
        record and this member's key."""
        name = record.name
        driver = self.driver(record.type)
        if await driver.local_config(name) is not None:
            await driver.delete(name)
        await self.store.transaction(
            [Delete(network_key(name)), Delete(network_member_key(name, self.member))]
        )
        self._forget(name)
        log.warning("network %s: removed what a create killed half-way had made", name)

    async def _move_nics_out(self, entry: Entry) -> None:
        """Give each NIC listed in a network record (as records were written before NICs
        had keys of their own) its key, then drop the list. Safe to run again after an
        interruption: the keys are written first, and the list goes last."""
        raw = entry.json()
        record = NetworkRecord.model_validate(raw)
        name = record.name
        writes: list[Put] = []
        for nic_key, value in (record.croft.nics or {}).items():
            project, instance, device = nic_key.split("/", 2)
            writes.append(Put(network_nic_key(name, project, instance, device), dump(value)))
        for start in range(0, len(writes), 100):  # etcd takes 128 operations at most
            await self.store.transaction(writes[start : start + 100])

        def drop_list(current: dict[str, Any]) -> dict[str, Any]:
            network = NetworkRecord.model_validate(current)
            croft = NetworkMeta.model_validate(network.croft.dump(exclude={"nics"}))
            return network.model_copy(update={"croft": croft, "used_by": []}).dump()

        await modify(
            self.store,
            entry.key,
            drop_list,
            missing="Network not found",
            current=(raw, entry.revision),
        )
        self._forget(name)
        log.info("network %s: moved %d NICs from its record to keys", name, len(writes))

    # ------------------------------------------------------------------ networks

    async def create_network(
        self, name: str, type_name: str, config: dict[str, str], description: str = ""
    ) -> NetworkRecord:
        """Create a managed network on this member and start it; returns its record.

        As LXD: the record is written first with this member `pending` (the network's
        status Pending), then the driver makes and starts it, then this member is
        `created` with the config the driver filled in (`auto` subnets). On any failure
        the driver's work is undone and the record and member key are removed: no
        bridge, no dnsmasq, no firewall table, no record. InvalidArgument for a bad
        name, type or config, Conflict if the name is taken."""
        if not name:
            raise InvalidArgument("No name provided")
        type_name = type_name or DEFAULT_NETWORK_TYPE
        driver = self.driver(type_name)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise InvalidArgument("Network config values must be strings")
        key = network_key(name)
        mine = network_member_key(name, self.member)

        async def create() -> NetworkRecord:
            self._forget(name)
            # Name and keys first: a bad request writes nothing at all.
            await driver.validate(name, {k: v for k, v in config.items() if v != ""})
            if await self.store.get(key) is not None:
                raise Conflict("The network already exists")
            pending = new_network_record(name, type_name, config, description).model_copy(
                update={"status": "Pending"}
            )
            try:
                revision = await self.store.transaction(
                    [
                        Create(key, dump(pending.dump())),
                        Put(mine, dump(member_entry(PENDING, config).dump())),
                    ]
                )
            except Conflict:
                raise Conflict("The network already exists") from None
            security = await self._security(name, driver, config)
            async with Reverter() as revert:
                revert.add(lambda: self.store.transaction([Delete(key), Delete(mine)]))
                # Registered once create succeeded: a create refused because the name is
                # some other interface's must not delete that interface.
                resolved = await driver.create(name, config)
                revert.add(lambda: driver.delete(name))
                await driver.start(name, resolved)
                if not security.empty:
                    await driver.apply_security(name, security)
                record = new_network_record(name, type_name, resolved, description)
                await self.store.transaction(
                    [
                        Update(key, dump(record.dump()), revision),
                        Put(mine, dump(member_entry(CREATED, resolved).dump())),
                    ]
                )
                revert.success()
            await self._lifecycle("network-created", name)
            return _with_config(record, resolved)

        return await self._locked(name, create)

    async def rename_network(self, name: str, new_name: str) -> NetworkRecord:
        """Rename a network that nothing is attached to (LXD's `POST /1.0/networks/NAME`):
        its host state, then its record and member keys, moved in one write. On failure
        it keeps its old name. InvalidArgument while NICs are attached, Conflict when
        the new name is taken."""
        if not new_name:
            raise InvalidArgument("New network name not provided")
        if new_name == name:
            raise Conflict(f'Network "{new_name}" already exists')

        async def rename() -> NetworkRecord:
            self._forget(name)
            self._forget(new_name)
            record, revision, mine, mine_revision = await self._local_entry(name)
            if await self._nic_entries(name):
                raise InvalidArgument("Network is currently in use")
            if await self.store.get(network_key(new_name)) is not None:
                raise Conflict(f'Network "{new_name}" already exists')
            states = await self._member_states(name)
            if set(states) != {self.member}:
                raise InvalidArgument("Renaming clustered network not supported")
            driver = self.driver(record.type)
            config = {**record.config, **mine.config}
            async with Reverter() as revert:
                await driver.rename(name, new_name, config)
                revert.add(lambda: driver.rename(new_name, name, config))
                new = record.model_copy(update={"name": new_name})
                await self.store.transaction(
                    [
                        Create(network_key(new_name), dump(new.dump())),
                        Put(network_member_key(new_name, self.member), dump(mine.dump())),
                        Delete(network_key(name), revision),
                        Delete(network_member_key(name, self.member), mine_revision),
                    ]
                )
                revert.success()
            self._forget(name)
            await self._lifecycle("network-renamed", new_name)
            return _with_config(new, config)

        async def both() -> NetworkRecord:
            return await self._locked(new_name, rename)

        return await self._locked(name, both)

    async def update_network(
        self, name: str, config: dict[str, str], description: str | None = None
    ) -> NetworkRecord:
        """Replace a network's config (and description, unless None) and converge the
        running network to it; returns the record. Bad config changes nothing."""
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise InvalidArgument("Network config values must be strings")

        async def update() -> NetworkRecord:
            self._forget(name)
            record, revision, mine, mine_revision = await self._local_entry(name)
            driver = self.driver(record.type)
            old_config = {**record.config, **mine.config}
            changed = {k for k in {*old_config, *config} if old_config.get(k) != config.get(k)}
            if changed & driver.fixed_in_use and await self._nic_entries(name):
                raise InvalidArgument(driver.fixed_in_use_message)
            await driver.validate(name, {k: v for k, v in config.items() if v != ""})
            security = await self._security(name, driver, config)
            old_security = await self._security(name, driver, old_config, check=False)
            try:
                resolved = await driver.update(name, config)
                await driver.apply_security(name, security)
            except BaseException:
                # A change that failed half-way (dnsmasq refusing raw.dnsmasq, say)
                # puts the running network back as it was.
                if await driver.is_running(name):
                    with contextlib.suppress(Exception):
                        await driver.update(name, old_config)
                with contextlib.suppress(Exception):
                    await driver.apply_security(name, old_security)
                raise
            cluster, member = split_config(resolved)
            # The cluster-wide keys go in the record, this member's own in its key: one
            # write, whose revisions catch any other writer meanwhile.
            changes: dict[str, Any] = {"config": cluster}
            if description is not None:
                changes["description"] = description
            new = record.model_copy(update=changes)
            try:
                await self.store.transaction(
                    [
                        Update(network_key(name), dump(new.dump()), revision),
                        Update(
                            network_member_key(name, self.member),
                            dump(mine.model_copy(update={"config": member}).dump()),
                            mine_revision,
                        ),
                    ]
                )
            except BaseException:
                await driver.update(name, old_config)
                await driver.apply_security(name, old_security)
                raise
            await self._lifecycle("network-updated", name)
            return _with_config(new, resolved)

        return await self._locked(name, update)

    async def delete_network(self, name: str) -> None:
        """Take a network down, remove its host state and its record. Refused while
        instance NICs are attached to it."""

        async def delete() -> None:
            self._forget(name)
            record = await self._local_record(name)
            if record.croft.nics or await self._nic_entries(name):
                raise InvalidArgument("The network is currently in use")
            # Host state first: a record left by a failure here is started (recreated) at
            # the next service start, never orphaned host state without a record.
            await self.driver(record.type).delete(name)
            # This member's key goes; the record with it when no other member has the
            # network, else its status and locations follow the members left.
            for _ in range(5):
                found = await self.store.get_json(network_key(name))
                if found is None:
                    break
                states = await self._member_states(name)
                states.pop(self.member, None)
                writes: list[Operation] = [Delete(network_member_key(name, self.member))]
                if states:
                    new = with_members(NetworkRecord.model_validate(found[0]), states)
                    writes.append(Update(network_key(name), dump(new.dump()), found[1]))
                else:
                    writes.append(Delete(network_key(name), found[1]))
                try:
                    await self.store.transaction(writes)
                    break
                except Conflict:
                    continue
                except NotFound:
                    break
            self._forget(name)
            await self._lifecycle("network-deleted", name)

        await self._locked(name, delete)

    # ------------------------------------------------------------------ instances

    async def attach_instance(self, nic: InstanceNic) -> NicAttachment:
        """Register an instance NIC with its network (DHCP host entry, DNS name, pinned
        address) and record it in `used_by`. Starts the network first if it is down.
        Attaching a NIC again updates it. On failure nothing is left registered."""
        if not nic.instance:
            raise InvalidArgument("No instance name given")
        if not nic.hwaddr:
            raise InvalidArgument("No MAC address given for the NIC")
        name = nic.network

        async def attach() -> NicAttachment:
            record = await self._nic_base(name)
            driver = self.driver(record.type)
            config = record.config
            known = (await self._nic_entries(name)).get(nic.key)
            previous = known[0] if known is not None else None
            hwaddr = nic.hwaddr.lower()

            if not await driver.is_running(name):
                await driver.start(name, config)
            if nic.acls and not driver.capabilities.nic_acls:
                # LXD 5.0.2's bridged NIC has no such key.
                raise InvalidArgument('Invalid device option "security.acls"')
            if nic.filters and not driver.capabilities.nic_filtering:
                raise InvalidArgument(
                    f"Network type {driver.name!r} does not support MAC or IP filtering"
                )
            if nic.filters and not nic.host_name:
                raise InvalidArgument("MAC or IP filtering needs the NIC's host interface")
            if nic.acls:
                check_acls_exist(nic.acl_config, await self._acls())
            ipv4 = nic.ipv4
            if "ipv4" in nic.filters and ipv4 is None:
                # LXD pins an address for a NIC whose IPv4 is filtered.
                ipv4 = await driver.allocate_ipv4(name, hwaddr)
            async with Reverter() as revert:
                if previous is not None and previous.hwaddr == hwaddr:
                    # add_instance replaces this NIC's entry: put the old one back.
                    old_ipv4 = previous.ipv4 or None
                    old_ipv6 = previous.ipv6 or None
                    revert.add(
                        lambda: driver.add_instance(
                            name, nic.dns_name, hwaddr, old_ipv4, ipv6=old_ipv6
                        )
                    )
                else:
                    revert.add(lambda: driver.remove_instance(name, nic.dns_name, hwaddr))
                address = await driver.add_instance(name, nic.dns_name, hwaddr, ipv4, ipv6=nic.ipv6)
                entry = NetworkNic(hwaddr=hwaddr, ipv4=address or "")
                if nic.ipv6:
                    # Only a pinned address is stored (the stored shape has no "" ipv6).
                    entry = entry.model_copy(update={"ipv6": nic.ipv6})
                if nic.filters:
                    entry = entry.model_copy(
                        update={"host_name": nic.host_name, "filters": list(nic.filters)}
                    )
                if nic.acls:
                    entry = entry.model_copy(update={"acls": dict(nic.acl_config)})
                await self._write_nic(nic, entry)
                secured = nic.filters or nic.acls
                if secured or (previous is not None and (previous.filters or previous.acls)):
                    revert.add(lambda: self._drop_nic(nic))
                    await driver.apply_security(
                        name, await self._security(name, driver, config, check=False)
                    )
                revert.success()
            if previous is not None and previous.hwaddr not in ("", hwaddr):
                await driver.remove_instance(name, nic.dns_name, previous.hwaddr)
            return NicAttachment(
                nic_type=driver.capabilities.nic_type,
                parent=driver.instance_parent(name, config, hwaddr),
                mtu=driver.instance_mtu(config),
                ipv4=address,
            )

        return await self._locked(name, attach)

    async def detach_instance(self, nic: InstanceNic) -> None:
        """Forget an instance NIC: its host entry, its lease (the address is free at
        once) and its place in `used_by`. Detaching a NIC, instance or network that is
        not known here does nothing."""
        name = nic.network
        if not name:
            raise InvalidArgument("No network name given")

        async def detach() -> None:
            try:
                record = await self._nic_base(name)
            except NotFound:
                return
            driver = self.driver(record.type)
            nics = await self._nic_entries(name)
            known = nics.get(nic.key)
            entry = known[0] if known is not None else None
            hwaddrs = {h.lower() for h in (nic.hwaddr, entry and entry.hwaddr) if h}
            for hwaddr in sorted(hwaddrs):
                await driver.remove_instance(name, nic.dns_name, hwaddr)
            if known is None:
                return
            await self._drop_nic(nic)
            if entry is not None and (entry.filters or entry.acls):
                await driver.apply_security(
                    name, await self._security(name, driver, record.config, check=False)
                )

        await self._locked(name, detach)

    async def _drop_nic(self, nic: InstanceNic) -> None:
        """Remove an attached NIC's key (and what is kept of it)."""
        try:
            await self.store.transaction([Delete(nic.store_key)])
        except BaseException:
            self._nics.pop(nic.network, None)
            raise
        self._nics.get(nic.network, {}).pop(nic.key, None)

    async def _nic_base(self, name: str) -> NetworkRecord:
        """The record of a network of this member, as a NIC change needs it."""
        record = self._records.get(name)
        if record is None:
            record = await self._local_record(name)
            self._records[name] = record
        return record

    async def _write_nic(self, nic: InstanceNic, entry: NetworkNic) -> None:
        """Record an attached NIC (compare-and-swap on its key, retried from the store's
        copy should another writer have changed it)."""
        name = nic.network
        value = dump(entry.dump())
        for _ in range(3):
            known = (await self._nic_entries(name)).get(nic.key)
            write = (
                Update(nic.store_key, value, known[1])
                if known is not None
                else Create(nic.store_key, value)
            )
            try:
                revision = await self.store.transaction([write])
            except Conflict:
                self._nics.pop(name, None)
                continue
            except BaseException:
                self._nics.pop(name, None)
                raise
            self._nics.setdefault(name, {})[nic.key] = (entry, revision)
            return
        raise Conflict(f"the NIC {nic.key} of network {name} kept changing while it was attached")

    # ------------------------------------------------------------------ security

    async def _security(
        self, name: str, driver: NetworkDriver, config: Mapping[str, str], *, check: bool = True
    ) -> NetworkSecurity:
        """What a network with `config` enforces, read from the store: its ACL policy
        (the ACLs of the default project: networks are not scoped by project), its
        forwards, its filtered NICs. With `check`, InvalidArgument (LXD's words) for an
        ACL that does not exist or a driver that cannot enforce ACLs."""
        acls = await self._acls()
        if check:
            check_acls_exist(config, acls)
        try:
            policy = network_policy(name, config, acls)
        except InvalidArgument:
            if check:
                raise
            policy = None
        if policy is not None and not driver.capabilities.acls:
            raise InvalidArgument(f"Network type {driver.name!r} does not support ACLs")
        forwards = tuple(
            Forward.from_record(entry.json())
            for entry in await self.store.list(forward_prefix(name))
        )
        if forwards and not driver.capabilities.forwards:
            if check:
                raise InvalidArgument(f"Network driver {driver.name!r} does not support forwards")
            forwards = ()
        nics = tuple(
            NicFilter(
                host_name=entry.host_name,
                hwaddr=entry.hwaddr,
                mac="mac" in entry.filters,
                ipv4=entry.ipv4 or None,
                ipv6=entry.ipv6 or None,
                ipv4_filtering="ipv4" in entry.filters,
                ipv6_filtering="ipv6" in entry.filters,
            )
            for entry, _ in (await self._nic_entries(name)).values()
            if entry.filters and entry.host_name
        )
        if not driver.capabilities.nic_filtering:
            nics = ()
        nic_acls: list[tuple[str, NetworkAclPolicy]] = []
        for entry, _ in (await self._nic_entries(name)).values():
            if not entry.acls or not driver.capabilities.nic_acls:
                continue
            try:
                nic_policy = network_policy(name, entry.acls, acls)
            except InvalidArgument:
                continue  # an ACL gone meanwhile: the rest still applies
            if nic_policy is not None:
                nic_acls.append((entry.hwaddr, nic_policy))
        return NetworkSecurity(
            acl=policy,
            forwards=forwards,
            nics=nics,
            nic_acls=tuple(sorted(nic_acls, key=lambda n: n[0])),
        )

    async def _acls(self) -> dict[str, Acl]:
        """The ACLs networks and NICs can name (the default project's: networks are not
        scoped by project)."""
        return {
            acl.name: acl
            for acl in (
                Acl.from_record(entry.json())
                for entry in await self.store.list(acl_prefix(DEFAULT_PROJECT))
            )
        }

    async def apply_security(self, name: str) -> None:
        """Enforce what the store says a network of this member enforces (its ACLs'
        rules, its forwards), replacing what was: asked after an ACL or a forward
        changes. A failure leaves the previous rules in force and is raised."""

        async def apply() -> None:
            self._forget(name)
            record = await self._local_record(name)
            driver = self.driver(record.type)
            await driver.apply_security(name, await self._security(name, driver, record.config))

        await self._locked(name, apply)

    # ------------------------------------------------------------------ state

    async def network_state(self, name: str) -> dict[str, Any]:
        """LXD's `GET /1.0/networks/<name>/state` metadata for a network of this member."""
        record = await self._local_record(name)
        state = await self.driver(record.type).state(name)
        return state.to_api()

    async def leases(self, name: str) -> list[dict[str, str]]:
        """LXD's `GET /1.0/networks/<name>/leases` metadata for a network of this member."""
        record = await self._local_record(name)
        driver = self.driver(record.type)
        if not driver.capabilities.dhcp:
            raise NotImplementedYet("Not implemented")  # LXD's answer for such networks
        leases = await driver.leases(name)
        return [lease.to_api() for lease in leases]
