"""A project's limits and restrictions, as LXD 5.0.2 enforces them (lxd/project/
permissions.go): the checks of instance, profile, snapshot, network and volume changes,
the reservations that hold a place for a create under way, and the project's state."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from croft.api.domain.project_config import FEATURES, FEATURES_ENABLE_NON_EMPTY, validate_config
from croft.api.domain.project_usage import config_of, custom_volumes, is_empty, used_by
from croft.common.errors import CroftError, InvalidArgument, PermissionDenied
from croft.common.instance_config import (
    go_quote,
    parse_byte_size,
)
from croft.common.models import InstanceRecord, StorageVolumeRecord
from croft.common.projects import is_true, owner
from croft.common.records import (
    DEFAULT_PROJECT,
    record_prefix,
)
from croft.common.store import Store

# ------------------------------------------------------------------ limits and restrictions

_AGGREGATES = ("limits.cpu", "limits.disk", "limits.memory", "limits.processes")
_TYPE_LIMIT = {"container": "limits.containers", "virtual-machine": "limits.virtual-machines"}

# LXD's defaults for a restricted project's restrictions.
_RESTRICTION_DEFAULTS = {
    "restricted.backups": "block",
    "restricted.cluster.target": "block",
    "restricted.containers.nesting": "block",
    "restricted.containers.lowlevel": "block",
    "restricted.containers.privilege": "unprivileged",
    "restricted.containers.interception": "block",
    "restricted.virtual-machines.lowlevel": "block",
    "restricted.devices.unix-char": "block",
    "restricted.devices.unix-block": "block",
    "restricted.devices.unix-hotplug": "block",
    "restricted.devices.infiniband": "block",
    "restricted.devices.gpu": "block",
    "restricted.devices.usb": "block",
    "restricted.devices.pci": "block",
    "restricted.devices.proxy": "block",
    "restricted.devices.nic": "managed",
    "restricted.devices.disk": "managed",
    "restricted.snapshots": "block",
}

_DEVICE_LABELS = {
    "unix-char": "Unix character devices",
    "unix-block": "Unix block devices",
    "unix-hotplug": "Unix hotplug devices",
    "infiniband": "Infiniband devices",
    "gpu": "GPU devices",
    "usb": "USB devices",
    "pci": "PCI devices",
    "proxy": "Proxy devices",
}

_CONTAINER_LOWLEVEL = (
    "boot.host_shutdown_timeout",
    "linux.kernel_modules",
    "raw.apparmor",
    "raw.idmap",
    "raw.lxc",
    "raw.seccomp",
    "security.devlxd.images",
    "security.idmap.base",
    "security.idmap.size",
)
_VM_LOWLEVEL = ("boot.host_shutdown_timeout", "limits.memory.hugepages", "raw.qemu")


def _restriction(config: Mapping[str, str], key: str) -> str:
    return config.get(key) or _RESTRICTION_DEFAULTS.get(key, "")


def _has_limits_or_restrictions(config: Mapping[str, str]) -> bool:
    return any(k.startswith("limits.") for k in config) or is_true(config.get("restricted"))


def _type_of(instance: Mapping[str, Any]) -> str:
    return str(instance.get("type") or "container")


def _type_label(instance_type: str) -> str:
    return "virtual machine" if instance_type == "virtual-machine" else "container"


def _device_problem(config: Mapping[str, str], device: Mapping[str, str]) -> str:
    kind = device.get("type", "")
    if kind in _DEVICE_LABELS:
        if _restriction(config, f"restricted.devices.{kind}") != "allow":
            return f"{_DEVICE_LABELS[kind]} are forbidden"
        return ""
    if kind == "nic":
        value = _restriction(config, "restricted.devices.nic")
        if value == "block":
            return "Network devices are forbidden"
        if value == "managed" and not device.get("network"):
            return "Only managed network devices are allowed"
        return ""
    if kind == "disk":
        if device.get("path") == "/" and device.get("pool"):
            return ""
        if not device.get("path") and device.get("source") == "cloud-init:config":
            return ""
        value = _restriction(config, "restricted.devices.disk")
        if value == "block":
            return "Disk devices are forbidden"
        if value == "managed" and not device.get("pool"):
            return "Attaching disks not backed by a pool is forbidden"
    return ""


def _config_problem(config: Mapping[str, str], key: str, value: str) -> str:
    privilege = _restriction(config, "restricted.containers.privilege")
    if key == "security.nesting" and is_true(value):
        if _restriction(config, "restricted.containers.nesting") == "block":
            return "Container nesting is forbidden"
    elif key == "security.privileged" and is_true(value):
        if privilege != "allow":
            return "Privileged containers are forbidden"
    elif key == "security.idmap.isolated" and privilege == "isolated" and not is_true(value):
        return "Non-isolated containers are forbidden"
    return ""


def _check_entity(
    project: str,
    pconfig: Mapping[str, str],
    entity: str,
    name: str,
    config: Mapping[str, str],
    devices: Mapping[str, Mapping[str, str]],
) -> None:
    """LXD's checkRestrictions for one instance (`entity` "container" or "virtual
    machine") or profile (`entity` "profile": LXD 5.0.2 names no entity type in a
    profile's config message, and so does croft)."""
    containerish = entity in ("container", "profile")
    vmish = entity in ("virtual machine", "profile")
    label = "" if entity == "profile" else entity
    for key, value in sorted(config.items()):
        lowlevel = (
            containerish
            and _restriction(pconfig, "restricted.containers.lowlevel") != "allow"
            and (key in _CONTAINER_LOWLEVEL or key.startswith("security.syscalls.intercept"))
        ) or (
            vmish
            and _restriction(pconfig, "restricted.virtual-machines.lowlevel") != "allow"
            and key in _VM_LOWLEVEL
        )
        if lowlevel:
            raise InvalidArgument(
                f"Use of low-level config {go_quote(key)} on {label} {go_quote(name)} of "
                f"project {go_quote(project)} is forbidden"
            )
        problem = _config_problem(pconfig, key, value) if containerish else ""
        if problem:
            raise InvalidArgument(
                f"Invalid value {go_quote(value)} for config {go_quote(key)} on {label} "
                f"{go_quote(name)} of project {go_quote(project)}: {problem}"
            )
    for device_name, device in sorted(devices.items()):
        problem = _device_problem(pconfig, device)
        if problem:
            raise InvalidArgument(
                f"Invalid device {go_quote(device_name)} on {entity} {go_quote(name)} of "
                f"project {go_quote(project)}: {problem}"
            )


def _check_restrictions(
    project: str,
    pconfig: Mapping[str, str],
    instances: list[dict[str, Any]],
    profiles: list[dict[str, Any]],
) -> None:
    for instance in instances:
        entity = _type_label(_type_of(instance))
        _check_entity(
            project,
            pconfig,
            entity,
            instance["name"],
            instance.get("expanded_config") or {},
            instance.get("expanded_devices") or {},
        )
    for profile in profiles:
        _check_entity(
            project,
            pconfig,
            "profile",
            profile["name"],
            profile.get("config") or {},
            profile.get("devices") or {},
        )


def _parse_aggregate(key: str, value: str) -> int:
    if key in ("limits.memory", "limits.disk"):
        if value.endswith("%"):
            raise ValueError("Value can't be a percentage")
        return parse_byte_size(value)
    if key == "limits.cpu" and ("," in value or "-" in value):
        raise ValueError("CPUs can't be pinned if project limits are used")
    if not value.isdigit():
        raise ValueError(f"Invalid value {go_quote(value)}")
    return int(value)


def _root_size(instance: Mapping[str, Any]) -> str:
    for device in (instance.get("expanded_devices") or {}).values():
        if device.get("type") == "disk" and device.get("path") == "/" and not device.get("source"):
            return str(device.get("size") or "")
    return ""


def _totals(
    project: str,
    keys: list[str],
    instances: list[dict[str, Any]],
    volumes: list[StorageVolumeRecord],
    *,
    skip_unset: bool,
) -> dict[str, int]:
    """LXD's getTotalsAcrossProjectEntities: each aggregate limit's sum over the
    project's instances (and custom volumes for `limits.disk`). Unless `skip_unset`, an
    instance without the key is an error, as in LXD: a project limit needs every
    instance to say its share."""
    totals = dict.fromkeys(keys, 0)
    for key in keys:
        if key == "limits.disk":
            for volume in volumes:
                size = volume.config.get("size", "")
                if not size:
                    if skip_unset:
                        continue
                    raise InvalidArgument(
                        f"Custom volume {go_quote(volume.name)} in project "
                        f'{go_quote(project)} has no "size" config set'
                    )
                with contextlib.suppress(ValueError):
                    totals[key] += parse_byte_size(size)
        for instance in instances:
            name = go_quote(instance["name"])
            if key == "limits.disk":
                value = _root_size(instance)
                missing = (
                    f"Instance {name} in project {go_quote(project)} has no "
                    '"size" config set on the root device, either directly or via a profile'
                )
            else:
                value = (instance.get("expanded_config") or {}).get(key, "")
                missing = (
                    f"Instance {name} in project {go_quote(project)} has no {go_quote(key)} "
                    "config, either directly or via a profile"
                )
            if not value:
                if skip_unset:
                    continue
                raise InvalidArgument(missing)
            try:
                totals[key] += _parse_aggregate(key, value)
            except ValueError:
                if skip_unset:
                    continue
                raise InvalidArgument(
                    f"Failed parsing {go_quote(key)} for instance {name} in project "
                    f"{go_quote(project)}"
                ) from None
    return totals


def _check_aggregates(
    project: str,
    pconfig: Mapping[str, str],
    instances: list[dict[str, Any]],
    volumes: list[StorageVolumeRecord],
) -> None:
    keys = [k for k in _AGGREGATES if pconfig.get(k)]
    if not keys:
        return
    with _prefixed("Failed getting usage of project entities: "):
        totals = _totals(project, keys, instances, volumes, skip_unset=False)
    for key in keys:
        if totals[key] > _parse_aggregate(key, pconfig[key]):
            raise InvalidArgument(
                f"Reached maximum aggregate value {go_quote(pconfig[key])} for "
                f"{go_quote(key)} in project {go_quote(project)}"
            )


@contextlib.contextmanager
def _prefixed(prefix: str) -> Iterator[None]:
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(f"{prefix}{exc}") from None


async def _instances(store: Store, project: str) -> list[dict[str, Any]]:
    return [entry.json() for entry in await store.list(record_prefix("instances", project))]


async def _profiles(store: Store, project: str, pconfig: Mapping[str, str]) -> list[dict[str, Any]]:
    owning = owner(project, pconfig, "profiles")
    return [entry.json() for entry in await store.list(record_prefix("profiles", owning))]


async def check_instance(
    store: Store,
    project: str,
    instance: Mapping[str, Any] | InstanceRecord,
    *,
    action: Literal["create", "update", "start"],
) -> None:
    """Refuse, with LXD's message, an instance record (`name`, `type`,
    `expanded_config`, `expanded_devices`) that `action` would leave breaking its
    project's limits (`limits.instances`, `limits.containers`,
    `limits.virtual-machines`, the aggregates `limits.cpu`, `limits.memory`,
    `limits.processes`, `limits.disk`) or, in a `restricted` project, its restrictions.
    The one check for every path that creates (copies included), changes or starts an
    instance."""
    pconfig = await config_of(store, project)
    if not _has_limits_or_restrictions(pconfig):
        return
    instance = instance.public() if isinstance(instance, InstanceRecord) else dict(instance)
    others = [i for i in await _instances(store, project) if i.get("name") != instance["name"]]
    instance_type = _type_of(instance)
    if action == "create" and any(
        pconfig.get(k, "") != "" for k in ("limits.instances", *_TYPE_LIMIT.values())
    ):
        # Two creates at once must not both take the last place: each reserves its
        # place first, and counts the places reserved before its own as taken.
        others += await _reserve(store, project, instance["name"], instance_type)
    try:
        _check_counts(project, pconfig, others, instance_type, action)
    except CroftError:
        await release_instance(store, project, instance["name"])
        raise
    verb = {"create": "creation", "update": "update", "start": "start"}[action]
    all_instances = [*(i for i in others if not i.get("reserved")), instance]
    with _prefixed(f"Failed checking if instance {verb} allowed: "):
        _check_aggregates(project, pconfig, all_instances, await custom_volumes(store, project))
        if is_true(pconfig.get("restricted")):
            profiles = await _profiles(store, project, pconfig)
            _check_restrictions(project, pconfig, all_instances, profiles)


RESERVATIONS = "/croft/reservations/instances/"
RESERVATION_SECONDS = 900.0  # a create still running after this no longer holds a place


async def _reserve(
    store: Store, project: str, name: str, instance_type: str
) -> list[dict[str, Any]]:
    """Reserve a place for `name` in `project`; the places other creates reserved before
    it (and whose instances are not recorded yet), as instances to count."""
    key = f"{RESERVATIONS}{project}/{name}"
    value = json.dumps({"name": name, "type": instance_type, "at": time.time()}).encode()
    mine = await store.put(key, value)
    taken = []
    for entry in await store.list(f"{RESERVATIONS}{project}/"):
        other = entry.json()
        if (
            entry.key != key
            and entry.create_revision < mine.create_revision
            and other.get("at", 0) > time.time() - RESERVATION_SECONDS
        ):
            taken.append({"name": other["name"], "type": other.get("type") or "container",
                          "reserved": True})  # fmt: skip
    return taken


async def release_instance(store: Store, project: str, name: str) -> None:
    """The create of `name` ended (made or failed): its reserved place goes."""
    with contextlib.suppress(CroftError):
        await store.delete(f"{RESERVATIONS}{project}/{name}")


def _check_counts(
    project: str,
    pconfig: Mapping[str, str],
    others: list[dict[str, Any]],
    instance_type: str,
    action: str,
) -> None:
    if action == "create":
        # An instance both recorded and reserved (its create is ending) counts once.
        recorded = {i.get("name") for i in others if not i.get("reserved")}
        others = [i for i in others if not i.get("reserved") or i["name"] not in recorded]
        type_key = _TYPE_LIMIT.get(instance_type, "")
        if type_key and pconfig.get(type_key, "") != "":
            count = sum(1 for i in others if _type_of(i) == instance_type)
            if count >= int(pconfig[type_key]):
                raise InvalidArgument(
                    f"Reached maximum number of instances of type {go_quote(instance_type)} "
                    f"in project {go_quote(project)}"
                )
        if pconfig.get("limits.instances", "") != "" and len(others) >= int(
            pconfig["limits.instances"]
        ):
            raise InvalidArgument(
                f"Reached maximum number of instances in project {go_quote(project)}"
            )


async def check_profile(
    store: Store, project: str, name: str, config: Mapping[str, str], devices: Mapping[str, Any]
) -> None:
    """LXD's AllowProfileUpdate: the profile `name` of `project` (the project that owns
    it) as it would be, held to the project's restrictions and aggregate limits, with
    the instances that use it."""
    pconfig = await config_of(store, project)
    if not _has_limits_or_restrictions(pconfig):
        return
    profiles = [p for p in await _profiles(store, project, pconfig) if p.get("name") != name]
    profiles.append({"name": name, "config": dict(config), "devices": dict(devices)})
    by_name = {p["name"]: p for p in profiles}
    instances = [
        _expanded_with(i, by_name) if name in (i.get("profiles") or []) else i
        for i in await _instances(store, project)
    ]
    with _prefixed("Failed checking if profile update allowed: "):
        _check_aggregates(project, pconfig, instances, await custom_volumes(store, project))
        if is_true(pconfig.get("restricted")):
            _check_restrictions(project, pconfig, instances, profiles)


def _expanded_with(instance: dict[str, Any], profiles: Mapping[str, Any]) -> dict[str, Any]:
    """`instance` expanded again over `profiles` (by name), as LXD's
    expandInstancesConfigAndDevices does before it sums a profile change's effect."""
    config: dict[str, str] = {}
    devices: dict[str, Any] = {}
    for profile_name in instance.get("profiles") or []:
        profile = profiles.get(profile_name) or {}
        config.update(profile.get("config") or {})
        devices.update(profile.get("devices") or {})
    config.update(instance.get("config") or {})
    devices.update(instance.get("devices") or {})
    return {**instance, "expanded_config": config, "expanded_devices": devices}


async def check_snapshot(store: Store, project: str) -> None:
    """LXD's AllowSnapshotCreation."""
    pconfig = await config_of(store, project)
    if is_true(pconfig.get("restricted")) and (
        _restriction(pconfig, "restricted.snapshots") == "block"
    ):
        raise InvalidArgument(f"Project {go_quote(project)} doesn't allow for snapshot creation")


async def check_network_creation(store: Store, project: str, name: str) -> None:
    """LXD's checks before a network is made for a request in `project`: a restricted
    project's `restricted.networks.access` names the networks it may use (403), and
    `limits.networks` counts the networks of a project with `features.networks`."""
    pconfig = await config_of(store, project)
    access = pconfig.get("restricted.networks.access", "")
    if (
        is_true(pconfig.get("restricted"))
        and access
        and name not in {a.strip() for a in access.split(",")}
    ):
        raise PermissionDenied("Network not allowed in project")
    if owner(project, pconfig, "networks") == DEFAULT_PROJECT or not pconfig.get("limits.networks"):
        return
    existing = {
        e.key.rsplit("/", 1)[1] for e in await store.list(record_prefix("networks", project))
    }
    if name not in existing and len(existing) >= int(pconfig["limits.networks"]):
        raise InvalidArgument("Networks limit has been reached for project")


async def check_volume(
    store: Store,
    project: str,
    name: str,
    config: Mapping[str, str],
    action: Literal["creation", "update"] = "creation",
) -> None:
    """LXD's AllowVolumeCreation/AllowVolumeUpdate: a custom volume `name` of `project`
    (the project that holds its volumes: `scope(request, "storage-volumes")`) with
    `config` keeps the project within `limits.disk` (every volume must then give its
    `size`)."""
    pconfig = await config_of(store, project)
    if not pconfig.get("limits.disk"):
        return
    volumes = [v for v in await custom_volumes(store, project) if v.name != name]
    volumes.append(StorageVolumeRecord(name=name, type="custom", config=dict(config)))
    with _prefixed(f"Failed checking if volume {action} allowed: "):
        _check_aggregates(
            project,
            {"limits.disk": pconfig["limits.disk"]},
            await _instances(store, project),
            volumes,
        )


def _printed(key: str, total: int) -> str:
    if key not in ("limits.memory", "limits.disk"):
        return str(total)
    if total < 1024:
        return f"{total}B"
    value = float(total)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f}{unit}"
    return f"{value:.1f}EiB"


async def check_project_change(
    store: Store, name: str, current: Mapping[str, str], wanted: Mapping[str, str]
) -> None:
    """LXD's projectChange checks and AllowProjectUpdate: features change only while the
    project is empty (and never in `default`), and new limits and restrictions must hold
    for what the project already has."""
    changed = sorted(
        {k for k in current if current.get(k) != wanted.get(k)}
        | {k for k in wanted if k not in current}
    )
    features = [k for k in changed if k in FEATURES]
    if features:
        if name == DEFAULT_PROJECT:
            raise InvalidArgument("You can't change the features of the default project")
        if not is_empty(await used_by(store, name, creating=True)):
            for feature in features:
                if is_true(current.get(feature)):
                    raise InvalidArgument(
                        f"Project feature {go_quote(feature)} cannot be disabled on "
                        "non-empty projects"
                    )
                if feature not in FEATURES_ENABLE_NON_EMPTY:
                    raise InvalidArgument(
                        f"Project feature {go_quote(feature)} cannot be enabled on "
                        "non-empty projects"
                    )
    validate_config(wanted)
    instances = await _instances(store, name)
    aggregates = []
    for key in changed:
        if key.startswith("restricted"):
            with _prefixed(
                f"Conflict detected when changing {go_quote(key)} in project {go_quote(name)}: "
            ):
                if is_true(wanted.get("restricted")):
                    _check_restrictions(
                        name, wanted, instances, await _profiles(store, name, wanted)
                    )
            continue
        value = wanted.get(key, "")
        if key == "limits.instances" and value != "" and int(value) < len(instances):
            raise InvalidArgument(
                f'Can\'t change limits.instances in project {go_quote(name)}: "limits.instances"'
                f" is too low: there currently are {len(instances)} total instances in project "
                f"{go_quote(name)}"
            )
        if key in ("limits.containers", "limits.virtual-machines") and value != "":
            instance_type = "container" if key == "limits.containers" else "virtual-machine"
            count = sum(1 for i in instances if _type_of(i) == instance_type)
            if int(value) < count:
                raise InvalidArgument(
                    f"Can't change {go_quote(key)} in project {go_quote(name)}: "
                    f"{go_quote(key)} is too low: there currently are {count} instances of "
                    f"type {instance_type} in project {go_quote(name)}"
                )
        if key in _AGGREGATES and value != "":
            aggregates.append(key)
    if aggregates:
        volumes = await custom_volumes(store, name)
        totals = _totals(name, aggregates, instances, volumes, skip_unset=False)
        for key in aggregates:
            if _parse_aggregate(key, wanted[key]) < totals[key]:
                raise InvalidArgument(
                    f"{go_quote(key)} is too low: current total is "
                    f"{go_quote(_printed(key, totals[key]))}"
                )


async def state(store: Store, name: str) -> dict[str, Any]:
    """`/1.0/projects/NAME/state`: each limit LXD reports, with its usage (-1: none)."""
    pconfig = await config_of(store, name)
    instances = [i for i in await _instances(store, name) if not InstanceRecord.meta_of(i).creating]
    totals = _totals(
        name, list(_AGGREGATES), instances, await custom_volumes(store, name), skip_unset=True
    )
    networks = await store.list(record_prefix("networks", name)) if name != DEFAULT_PROJECT else []

    def limit(key: str) -> int:
        value = pconfig.get(key, "")
        if not value:
            return -1
        try:
            return _parse_aggregate(key, value) if key in _AGGREGATES else int(value)
        except ValueError:
            return -1

    count = {t: sum(1 for i in instances if _type_of(i) == t) for t in _TYPE_LIMIT}
    usage = {
        "containers": ("limits.containers", count["container"]),
        "cpu": ("limits.cpu", totals["limits.cpu"]),
        "disk": ("limits.disk", totals["limits.disk"]),
        "instances": ("limits.instances", len(instances)),
        "memory": ("limits.memory", totals["limits.memory"]),
        "networks": ("limits.networks", len(networks)),
        "processes": ("limits.processes", totals["limits.processes"]),
        "virtual-machines": ("limits.virtual-machines", count["virtual-machine"]),
    }
    return {
        "resources": {
            resource: {"Limit": limit(key), "Usage": used}
            for resource, (key, used) in usage.items()
        }
    }
