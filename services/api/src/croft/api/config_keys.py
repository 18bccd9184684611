"""Declared configuration keys: server config (`/1.0`) and instance/profile config, with
LXD 5.0's names and value checks. A key is declared once, here, with its validator.

Validators take the string value and raise ValueError with a message for a person.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from croft.common.errors import InvalidArgument

Validator = Callable[[str], None]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def is_bool(value: str) -> None:
    if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f'Invalid value for a boolean "{value}"')


def is_int(value: str) -> None:
    try:
        int(value)
    except ValueError:
        raise ValueError(f'Invalid value for an integer "{value}"') from None


def int_range(low: int, high: int) -> Validator:
    def check(value: str) -> None:
        is_int(value)
        if not low <= int(value) <= high:
            raise ValueError(f"Value must be between {low} and {high}")

    return check


def one_of(*choices: str) -> Validator:
    def check(value: str) -> None:
        if value not in choices:
            # LXD prints the choices as a Go slice: [soft hard].
            raise ValueError(f'Invalid value "{value}" (not one of [{" ".join(choices)}])')

    return check


def priority(value: str) -> None:
    """LXD's `limits.*.priority`: an integer 0-10."""
    is_int(value)
    if not 0 <= int(value) <= 10:
        raise ValueError(f'Invalid value for a limit "{value}". Must be between 0 and 10')


def any_string(value: str) -> None:
    return None


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    " bytes": 1,
    "kB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "PB": 1000**5,
    "EB": 1000**6,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "PiB": 1024**5,
    "EiB": 1024**6,
}


def parse_size(value: str) -> int:
    """Bytes in a size string, the way LXD's `units.ParseByteSizeString` reads it: an
    integer and one of its exact suffixes (`512MiB`, `2GB`, `100`); no decimals, no
    spaces before the unit. Empty is 0. ValueError with LXD's message otherwise."""
    if value == "":
        return 0
    digits = len(value) - len(value.lstrip("0123456789"))
    if digits == 0:
        raise ValueError(f"Invalid value: {value}")
    suffix = value[digits:]
    if suffix not in _SIZE_UNITS:
        raise ValueError(f"Invalid value: {value}")
    return int(value[:digits]) * _SIZE_UNITS[suffix]


def is_size(value: str) -> None:
    parse_size(value)


def memory_limit(value: str) -> None:
    """`limits.memory`: a size or a percentage of the host's memory, never 0."""
    if value.endswith("%"):
        number = value[:-1]
        try:
            percent = int(number)
        except ValueError:
            # LXD passes Go's strconv error through unchanged.
            raise ValueError(f'strconv.ParseInt: parsing "{number}": invalid syntax') from None
        if percent == 0:
            raise ValueError("Memory limit can't be 0%")
        return
    if parse_size(value) == 0:
        raise ValueError("Memory limit can't be 0")


_CPU_SET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def cpu_limit(value: str) -> None:
    if not _CPU_SET.match(value):
        raise ValueError("Invalid CPU limit syntax")


def cpu_allowance(value: str) -> None:
    if re.match(r"^\d+%$", value) or re.match(r"^\d+ms/\d+ms$", value):
        return
    raise ValueError(f"Invalid allowance: {value}")


def listen_address(value: str) -> None:
    if value in ("", ":", "[::]"):
        return
    host, sep, port = value.rpartition(":")
    if sep and port and not port.isdigit():
        raise ValueError(f'Invalid address "{value}"')
    if not (host or value).strip("[]"):
        raise ValueError(f'Invalid address "{value}"')


@dataclass(frozen=True)
class KeySet:
    """Exact keys plus prefixes (`user.`) that accept any suffix."""

    keys: Mapping[str, Validator]
    prefixes: Mapping[str, Validator]

    def validator(self, key: str) -> Validator | None:
        if key in self.keys:
            return self.keys[key]
        for prefix, check in self.prefixes.items():
            if key.startswith(prefix) and len(key) > len(prefix):
                return check
        return None


# -- /1.0 (LXD 5.0 server keys) -----------------------------------------------------------

SERVER_KEYS = KeySet(
    keys={
        "core.https_address": listen_address,
        "core.https_allowed_credentials": is_bool,
        "core.https_allowed_headers": any_string,
        "core.https_allowed_methods": any_string,
        "core.https_allowed_origin": any_string,
        "core.https_trusted_proxy": any_string,
        "core.metrics_address": listen_address,
        "core.proxy_http": any_string,
        "core.proxy_https": any_string,
        "core.proxy_ignore_hosts": any_string,
        "core.shutdown_timeout": is_int,
        "core.trust_ca_certificates": is_bool,
        "core.trust_password": any_string,
        "cluster.https_address": listen_address,
        "cluster.images_minimal_replica": int_range(-1, 1000),
        "cluster.max_standby": int_range(0, 5),
        "cluster.max_voters": int_range(3, 99),
        "cluster.offline_threshold": int_range(10, 86400),
        "images.auto_update_cached": is_bool,
        "images.auto_update_interval": is_int,
        "images.compression_algorithm": any_string,
        "images.default_architecture": any_string,
        "images.remote_cache_expiry": is_int,
        "storage.backups_volume": any_string,
        "storage.images_volume": any_string,
    },
    prefixes={"user.": any_string},
)


def validate_server_config(config: Mapping[str, str]) -> None:
    """400 with LXD's message for an unknown key or a bad value."""
    for key, value in config.items():
        check = SERVER_KEYS.validator(key)
        if check is None:
            raise InvalidArgument(f"cannot set '{key}' to '{value}': unknown key")
        try:
            check(value)
        except ValueError as exc:
            raise InvalidArgument(f"cannot set '{key}' to '{value}': {exc}") from None


# -- instance and profile config (LXD 5.0 instance keys) ----------------------------------

INSTANCE_KEYS = KeySet(
    keys={
        "boot.autostart": is_bool,
        "boot.autostart.delay": is_int,
        "boot.autostart.priority": is_int,
        "boot.host_shutdown_timeout": is_int,
        "boot.stop.priority": is_int,
        "cloud-init.network-config": any_string,
        "cloud-init.user-data": any_string,
        "cloud-init.vendor-data": any_string,
        "cluster.evacuate": one_of("auto", "migrate", "stop"),
        "limits.cpu": cpu_limit,
        "limits.cpu.allowance": cpu_allowance,
        "limits.cpu.priority": priority,
        "limits.disk.priority": priority,
        "limits.memory": memory_limit,
        "limits.memory.enforce": one_of("soft", "hard"),
        "limits.memory.swap": is_bool,
        "limits.memory.swap.priority": priority,
        "limits.network.priority": priority,
        "limits.processes": is_int,
        "linux.kernel_modules": any_string,
        "migration.incremental.memory": is_bool,
        "migration.stateful": is_bool,
        "nvidia.driver.capabilities": any_string,
        "nvidia.require.cuda": any_string,
        "nvidia.require.driver": any_string,
        "nvidia.runtime": is_bool,
        "raw.apparmor": any_string,
        "raw.idmap": any_string,
        "raw.lxc": any_string,
        "raw.qemu": any_string,
        "raw.seccomp": any_string,
        "security.devlxd": is_bool,
        "security.devlxd.images": is_bool,
        "security.idmap.base": is_int,
        "security.idmap.isolated": is_bool,
        "security.idmap.size": is_int,
        "security.nesting": is_bool,
        "security.privileged": is_bool,
        "security.protection.delete": is_bool,
        "security.protection.shift": is_bool,
        "security.secureboot": is_bool,
        "security.syscalls.allow": any_string,
        "security.syscalls.deny": any_string,
        "security.syscalls.deny_compat": is_bool,
        "security.syscalls.deny_default": is_bool,
        "security.syscalls.intercept.bpf": is_bool,
        "security.syscalls.intercept.bpf.devices": is_bool,
        "security.syscalls.intercept.mknod": is_bool,
        "security.syscalls.intercept.mount": is_bool,
        "security.syscalls.intercept.mount.allowed": any_string,
        "security.syscalls.intercept.mount.fuse": any_string,
        "security.syscalls.intercept.mount.shift": is_bool,
        "security.syscalls.intercept.setxattr": is_bool,
        "snapshots.expiry": any_string,
        "snapshots.pattern": any_string,
        "snapshots.schedule": any_string,
        "snapshots.schedule.stopped": is_bool,
    },
    prefixes={
        "user.": any_string,
        "environment.": any_string,
        "image.": any_string,
        "limits.kernel.": any_string,
        "limits.hugepages.": is_size,
        "linux.sysctl.": any_string,
    },
)


# LXD 5.0's volatile keys: these exact ones, and `volatile.<device>.<suffix>`.
VOLATILE_KEYS = frozenset(
    {
        "volatile.apply_template",
        "volatile.base_image",
        "volatile.cloud-init.instance-id",
        "volatile.evacuate.origin",
        "volatile.idmap.base",
        "volatile.idmap.current",
        "volatile.idmap.next",
        "volatile.last_state.idmap",
        "volatile.last_state.power",
        "volatile.uuid",
        "volatile.vsock_id",
    }
)
VOLATILE_DEVICE_SUFFIXES = (
    ".apply_quota",
    ".ceph_rbd",
    ".created",
    ".driver",
    ".host_name",
    ".hwaddr",
    ".id",
    ".mtu",
    ".name",
    ".spoofcheck",
    ".uuid",
    ".vlan",
)


def _known_volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or (key.count(".") >= 2 and key.endswith(VOLATILE_DEVICE_SUFFIXES))


def validate_instance_config(config: Mapping[str, str], *, profile: bool) -> None:
    """Instance (or, with `profile`, profile) config keys, as LXD checks them.

    InvalidArgument carries LXD's bare message (`Unknown configuration key: foo.bar`,
    `Invalid CPU limit syntax`); the endpoints add LXD's context in front of it."""
    for key, value in config.items():
        if key.startswith("volatile."):
            if profile:
                raise InvalidArgument("Volatile keys can only be set on instances")
            if not _known_volatile(key):
                raise InvalidArgument(f"Unknown configuration key: {key}")
            continue
        check = INSTANCE_KEYS.validator(key)
        if check is None:
            raise InvalidArgument(f"Unknown configuration key: {key}")
        try:
            check(value)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None


# -- devices ------------------------------------------------------------------------------

DEVICE_TYPES = (
    "none",
    "nic",
    "disk",
    "unix-char",
    "unix-block",
    "unix-hotplug",
    "usb",
    "gpu",
    "infiniband",
    "proxy",
    "tpm",
    "pci",
)
NIC_TYPES = ("bridged", "macvlan", "sriov", "physical", "ipvlan", "p2p", "routed")


class _LoadError(ValueError):
    """A device LXD cannot even load (no driver for its type): LXD words these as
    `Failed loading device "x": ...`, and its other checks without that part."""


def _check_device(device: Mapping[str, str]) -> None:
    kind = device.get("type", "")
    if not kind:
        raise _LoadError("Missing device type in config")
    if kind not in DEVICE_TYPES:
        raise _LoadError("Unsupported device type")
    if kind == "nic":
        # LXD picks a NIC driver from `nictype`, or from the managed network's type:
        # with neither (or an unknown nictype) there is no driver to load.
        nictype = device.get("nictype", "")
        if (not nictype and not device.get("network")) or (nictype and nictype not in NIC_TYPES):
            raise _LoadError("Unsupported device type")
    if kind == "disk":
        path, source, pool = device.get("path", ""), device.get("source", ""), device.get("pool")
        if path == "/":
            if not pool:
                raise ValueError('Root disk entry must have a "pool" property set')
        elif not source and not pool:
            raise ValueError('Disk entry is missing the required "source" or "path" property')
        elif not path:
            # LXD 5.0 accepts a container disk without a path and fails later; refuse it.
            raise ValueError('Disk entry is missing the required "path" property')


def device_type_problem(devices: Mapping[str, Mapping[str, str]]) -> str:
    """LXD's first check of a new instance's own devices, before any other (its database
    knows only these types): `Invalid device type X`, or "" when all are known."""
    for device in devices.values():
        kind = device.get("type", "")
        if kind not in DEVICE_TYPES:
            return f"Invalid device type {kind}"
    return ""


def validate_devices(devices: Mapping[str, Mapping[str, str]]) -> None:
    """Devices (an instance's own, expanded, or a profile's), as LXD validates them.
    InvalidArgument with LXD's message; instance endpoints prefix `Invalid devices: `."""
    for name, device in devices.items():
        if not name:
            raise InvalidArgument("Device name cannot be empty")
        try:
            _check_device(device)
        except _LoadError as exc:
            raise InvalidArgument(
                f'Device validation failed for "{name}": Failed loading device "{name}": {exc}'
            ) from None
        except ValueError as exc:
            raise InvalidArgument(f'Device validation failed for "{name}": {exc}') from None
    roots = [
        name for name, d in devices.items() if d.get("type") == "disk" and d.get("path") == "/"
    ]
    if len(roots) > 1:
        raise InvalidArgument("Failed detecting root disk device: More than one root device found")
