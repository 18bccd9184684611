"""A project's name and config keys, as LXD 5.0.2 checks them (lxd/api_project.go), and
the features a project may own (`croft.api.domain.projects` gathers the project modules)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from croft.common.errors import InvalidArgument
from croft.common.instance_config import (
    go_quote,
    has_control,
    parse_bool,
    parse_byte_size,
    parse_int,
)
from croft.common.projects import is_true

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
