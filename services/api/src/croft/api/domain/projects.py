"""Projects as LXD 5.0 has them: names and config keys, what a project owns (its
features), what uses it, its limits and restrictions, and the one check every instance
create, update and start goes through (`check_instance`).

Messages are LXD 5.0.2's, measured against it (`LXD_DIR=/var/lib/lxd lxc project ...`);
its checks live in lxd/api_project.go and lxd/project/permissions.go.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from starlette.requests import Request

from croft.api import query, records
from croft.api.context import context
from croft.common.errors import CroftError, InvalidArgument, NotFound, PermissionDenied
from croft.common.instance_config import (
    go_quote,
    has_control,
    parse_bool,
    parse_byte_size,
    parse_int,
)
from croft.common.models import InstanceRecord, ProfileRecord, StorageVolumeRecord
from croft.common.network_acl import acl_prefix
from croft.common.projects import FEATURE_OF_KIND, is_true, owner
from croft.common.records import (
    DEFAULT_PROJECT,
    STORAGE_VOLUMES,
    project_key,
    record_key,
    record_prefix,
)
from croft.common.store import Entry, Store

__all__ = [
    "FEATURE_OF_KIND",
    "check_instance",
    "check_network_creation",
    "check_volume",
    "check_profile",
    "check_project_change",
    "check_snapshot",
    "default_profile",
    "default_profile_key",
    "is_empty",
    "is_true",
    "instance_entries",
    "load",
    "new_project_config",
    "owner",
    "scope",
    "state",
    "used_by",
    "validate_config",
    "validate_name",
]

FEATURES = ("features.images", "features.profiles", "features.storage.volumes", "features.networks")
# Enabled on a new project unless the request says otherwise (LXD: features.networks
# stays off until OVN is practical everywhere).
FEATURES_ON_CREATE = ("features.images", "features.profiles", "features.storage.volumes")
# Features that may be turned on in a project that already holds something (measured:
# LXD 5.0.2 lets `features.networks` be enabled on a non-empty project).
FEATURES_ENABLE_NON_EMPTY = ("features.networks",)

_UINT32 = (1 << 32) - 1


# ------------------------------------------------------------------ names and config


def validate_name(name: str) -> None:
    """LXD's projectValidateName, in its order and words."""
    if not name:
        raise InvalidArgument("No name provided")
    if "/" in name:
        raise InvalidArgument("Project names may not contain slashes")
    if " " in name:
        raise InvalidArgument("Project names may not contain spaces")
    if "_" in name:
        raise InvalidArgument("Project names may not contain underscores")
    if "'" in name or '"' in name:
        raise InvalidArgument("Project names may not contain quotes")
    if name == "*":
        raise InvalidArgument("Reserved project name")
    if name in (".", ".."):
        raise InvalidArgument(f"Invalid project name {go_quote(name)}")
    if has_control(name):
        # LXD takes them; croft keeps them out of store keys, host names and URLs.
        raise InvalidArgument("Project names may not contain control characters")


def _optional(check: Callable[[str], object]) -> Callable[[str], None]:
    def run(value: str) -> None:
        if value != "":
            check(value)

    return run


def _uint32(value: str) -> None:
    if not value.isdigit() or int(value) > _UINT32:
        raise ValueError(
            f"Invalid value for uint32 {go_quote(value)}: strconv.ParseUint: parsing "
            f"{go_quote(value)}: {'value out of range' if value.isdigit() else 'invalid syntax'}"
        )


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"Invalid value {go_quote(value)} (not one of [{' '.join(choices)}])")

    return _optional(check)


def _size(value: str) -> None:
    if value.endswith("%"):
        raise ValueError(f"Invalid value: {value}")
    parse_byte_size(value)


def _id_ranges(value: str) -> None:
    for item in value.split(","):
        for part in item.strip().split("-", 1):
            if not part.strip().isdigit():
                raise ValueError(f"Item {go_quote(item)}: Invalid number {go_quote(part)}")


def _subnets(value: str) -> None:
    for subnet in (s.strip() for s in value.split(",") if s.strip()):
        if ":" not in subnet:
            raise ValueError(
                f'Subnet {go_quote(subnet)} invalid, must be in the format of "<uplink network>:<subnet>"'
            )


def _anything(value: str) -> None:
    return None


_BLOCK_ALLOW = _one_of("block", "allow")
_BLOCK_ALLOW_MANAGED = _one_of("block", "allow", "managed")

# LXD 5.0.2's project keys (projectValidateConfig), with its validators.
CONFIG_KEYS: dict[str, Callable[[str], None]] = {
    "backups.compression_algorithm": _anything,
    "features.images": _optional(parse_bool),
    "features.profiles": _optional(parse_bool),
    "features.storage.volumes": _optional(parse_bool),
    "features.networks": _optional(parse_bool),
    "images.auto_update_cached": _optional(parse_bool),
    "images.auto_update_interval": _optional(parse_int),
    "images.compression_algorithm": _anything,
    "images.default_architecture": _anything,
    "images.remote_cache_expiry": _optional(parse_int),
    "limits.instances": _optional(_uint32),
    "limits.containers": _optional(_uint32),
    "limits.virtual-machines": _optional(_uint32),
    "limits.memory": _optional(_size),
    "limits.processes": _optional(_uint32),
    "limits.cpu": _optional(_uint32),
    "limits.disk": _optional(_size),
    "limits.networks": _optional(_uint32),
    "restricted": _optional(parse_bool),
    "restricted.backups": _BLOCK_ALLOW,
    "restricted.cluster.groups": _anything,
    "restricted.cluster.target": _BLOCK_ALLOW,
    "restricted.containers.interception": _one_of("allow", "block", "full"),
    "restricted.containers.lowlevel": _BLOCK_ALLOW,
    "restricted.containers.nesting": _BLOCK_ALLOW,
    "restricted.containers.privilege": _one_of("allow", "unprivileged", "isolated"),
    "restricted.devices.disk": _BLOCK_ALLOW_MANAGED,
    "restricted.devices.gpu": _BLOCK_ALLOW,
    "restricted.devices.infiniband": _BLOCK_ALLOW,
    "restricted.devices.nic": _BLOCK_ALLOW_MANAGED,
    "restricted.devices.pci": _BLOCK_ALLOW,
    "restricted.devices.proxy": _BLOCK_ALLOW,
    "restricted.devices.unix-block": _BLOCK_ALLOW,
    "restricted.devices.unix-char": _BLOCK_ALLOW,
    "restricted.devices.unix-hotplug": _BLOCK_ALLOW,
    "restricted.devices.usb": _BLOCK_ALLOW,
    "restricted.idmap.gid": _optional(_id_ranges),
    "restricted.idmap.uid": _optional(_id_ranges),
    "restricted.networks.access": _anything,
    "restricted.networks.subnets": _optional(_subnets),
    "restricted.networks.uplinks": _anything,
    "restricted.networks.zones": _anything,
    "restricted.snapshots": _BLOCK_ALLOW,
    "restricted.virtual-machines.lowlevel": _BLOCK_ALLOW,
}


def validate_config(config: Mapping[str, str]) -> None:
    """InvalidArgument, as LXD words it, for an unknown key or a bad value."""
    for key, value in config.items():
        if key.startswith("user."):
            continue
        check = CONFIG_KEYS.get(key)
        if check is None:
            raise InvalidArgument(f"Invalid project configuration key {go_quote(key)}")
        try:
            check(value)
        except ValueError as exc:
            raise InvalidArgument(
                f"Invalid project configuration key {go_quote(key)} value: {exc}"
            ) from None
    if is_true(config.get("restricted")) and not is_true(config.get("features.profiles")):
        # LXD: the default project's profiles are not held to this project's restrictions.
        raise InvalidArgument("Projects without their own profiles cannot be restricted")


def new_project_config(config: Mapping[str, str] | None) -> dict[str, str]:
    """A new project's config: LXD's default features, then what was asked."""
    return {**{feature: "true" for feature in FEATURES_ON_CREATE}, **(config or {})}


# ------------------------------------------------------------------ reading


async def load(store: Store, name: str) -> tuple[dict[str, Any], int]:
    found = await store.get_json(project_key(name))
    if found is None:
        raise NotFound("Project not found")
    return found


async def _config(store: Store, project: str) -> dict[str, str]:
    found = await store.get_json(project_key(project))
    if found is None:
        raise NotFound(f'Failed loading project "{project}": Project not found')
    config: dict[str, str] = found[0].get("config") or {}
    return config


async def scope(request: Request, kind: str) -> str:
    """The project whose records of `kind` (`profiles`, `images`, `networks`...) a
    request for `?project=` reads and writes: that project, or `default` when the
    project shares default's (its feature for that kind is off). NotFound, as LXD words
    it, for a project that does not exist."""
    project = query.project(request)
    record = await records.require_project(context(request).store, project)
    if record is None:
        return project
    return owner(project, record.get("config"), kind)


async def sharing(store: Store, project: str, kind: str) -> list[str]:
    """`project` and every project that uses its records of `kind` (the projects whose
    feature for `kind` is off share `default`'s)."""
    if project != DEFAULT_PROJECT:
        return [project]
    shared = [project]
    for entry in await store.list(f"{records.RECORDS}projects/"):
        record = entry.json()
        name = str(record.get("name", ""))
        if name != DEFAULT_PROJECT and owner(name, record.get("config"), kind) == project:
            shared.append(name)
    return shared


async def instance_entries(store: Store, project: str, kind: str) -> list[tuple[str, Entry]]:
    """The instances (project, store entry) that use `project`'s records of `kind`:
    its own and those of the projects that share them."""
    found = []
    for name in await sharing(store, project, kind):
        found += [(name, e) for e in await store.list(record_prefix("instances", name))]
    return found


# The kinds of record a project can hold, in the order LXD lists them in `used_by`.
_USED_BY_KINDS = ("instances", "profiles", "images", "networks")


async def used_by(store: Store, project: str, *, creating: bool = False) -> list[str]:
    """What a project holds, as LXD's `used_by` lists it: its instances, profiles,
    images, custom volumes and networks (only those it owns). With `creating`, the
    instances still being created too (they keep a project from going)."""
    urls: list[str] = []
    for kind in _USED_BY_KINDS:
        for entry in await store.list(record_prefix(kind, project)):
            name = entry.key.removeprefix(record_prefix(kind, project))
            if "/" in name:
                continue
            if (
                kind == "instances"
                and not creating
                and InstanceRecord.meta_of(entry.json()).creating
            ):
                continue
            urls.append(records.url(kind, name, project))
        if kind == "images":
            for volume in await _custom_volumes(store, project):
                urls.append(
                    records.url(
                        f"storage-pools/{volume.croft.pool}/volumes/custom", volume.name, project
                    )
                )
    for entry in await store.list(acl_prefix(project)):
        urls.append(
            records.url("network-acls", entry.key.removeprefix(acl_prefix(project)), project)
        )
    return urls


def is_empty(uses: list[str]) -> bool:
    """LXD's projectIsEmpty: nothing but its own default profile (and network ACLs,
    which LXD 5.0.2 lists but deletes with the project)."""
    kept = [u for u in uses if not u.startswith("/1.0/network-acls/")]
    return not kept or (len(kept) == 1 and "/profiles/default" in kept[0])


async def _custom_volumes(store: Store, project: str) -> list[StorageVolumeRecord]:
    """The project's custom volumes, snapshots aside (every volume record is under
    default's storage-volumes, `<pool>/custom/<host name>`, and names its project)."""
    found = []
    for entry in await store.list(record_prefix(STORAGE_VOLUMES, DEFAULT_PROJECT)):
        volume = StorageVolumeRecord.model_validate(entry.json())
        if volume.type == "custom" and volume.project == project and "/" not in volume.name:
            found.append(volume)
    return found


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
    pconfig = await _config(store, project)
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
        _check_aggregates(project, pconfig, all_instances, await _custom_volumes(store, project))
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
    pconfig = await _config(store, project)
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
        _check_aggregates(project, pconfig, instances, await _custom_volumes(store, project))
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
    pconfig = await _config(store, project)
    if is_true(pconfig.get("restricted")) and (
        _restriction(pconfig, "restricted.snapshots") == "block"
    ):
        raise InvalidArgument(f"Project {go_quote(project)} doesn't allow for snapshot creation")


async def check_network_creation(store: Store, project: str, name: str) -> None:
    """LXD's checks before a network is made for a request in `project`: a restricted
    project's `restricted.networks.access` names the networks it may use (403), and
    `limits.networks` counts the networks of a project with `features.networks`."""
    pconfig = await _config(store, project)
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
    pconfig = await _config(store, project)
    if not pconfig.get("limits.disk"):
        return
    volumes = [v for v in await _custom_volumes(store, project) if v.name != name]
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
        volumes = await _custom_volumes(store, name)
        totals = _totals(name, aggregates, instances, volumes, skip_unset=False)
        for key in aggregates:
            if _parse_aggregate(key, wanted[key]) < totals[key]:
                raise InvalidArgument(
                    f"{go_quote(key)} is too low: current total is "
                    f"{go_quote(_printed(key, totals[key]))}"
                )


async def state(store: Store, name: str) -> dict[str, Any]:
    """`/1.0/projects/NAME/state`: each limit LXD reports, with its usage (-1: none)."""
    pconfig = await _config(store, name)
    instances = [i for i in await _instances(store, name) if not InstanceRecord.meta_of(i).creating]
    totals = _totals(
        name, list(_AGGREGATES), instances, await _custom_volumes(store, name), skip_unset=True
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


def default_profile(project: str) -> ProfileRecord:
    """The `default` profile LXD gives a project with its own profiles: no devices."""
    return ProfileRecord(
        name="default",
        description=f"Default LXD profile for project {project}",
        config={},
        devices={},
    )


def default_profile_key(project: str) -> str:
    return record_key("profiles", project, "default")
