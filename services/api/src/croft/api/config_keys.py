"""Declared configuration keys: server config (`/1.0`) with LXD 5.0's names and value
checks, each declared once, here, with its validator; instance and profile config through
croft.common.instance_config, where compute reads them too; devices.

Validators take the string value and raise ValueError with a message for a person.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from croft.api import oidc
from croft.common import instance_config
from croft.common.errors import InvalidArgument
from croft.common.instance_config import (
    any_string,
    go_quote,
    has_control,
    int_range,
    parse_bool,
    parse_int,
)

# Parses a value (the result is dropped) or raises ValueError with a message for a person.
Validator = Callable[[str], object]


def _odd_voters(value: str) -> None:
    if not value.isdigit() or int(value) < 3 or int(value) % 2 == 0:
        raise ValueError("Value must be an odd number equal to or higher than 3")


def _expiry(value: str) -> None:
    """LXD's expiry strings (shared.GetExpiry): a number and a unit, `30M`, `3H`, `1d`."""
    import re

    if not re.fullmatch(r"(\d+[SMHdwMy])+", value.strip()):
        raise ValueError("Invalid expiry")


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
        "core.https_allowed_credentials": parse_bool,
        "core.https_allowed_headers": any_string,
        "core.https_allowed_methods": any_string,
        "core.https_allowed_origin": any_string,
        "core.https_trusted_proxy": any_string,
        "core.metrics_address": listen_address,
        "core.proxy_http": any_string,
        "core.proxy_https": any_string,
        "core.proxy_ignore_hosts": any_string,
        "core.shutdown_timeout": parse_int,
        "core.trust_ca_certificates": parse_bool,
        "core.trust_password": any_string,
        "cluster.https_address": listen_address,
        "cluster.images_minimal_replica": int_range(-1, 1000),
        "cluster.join_token_expiry": _expiry,
        "cluster.max_standby": int_range(0, 5),
        "cluster.max_voters": _odd_voters,
        "cluster.offline_threshold": int_range(10, 86400),
        "images.auto_update_cached": parse_bool,
        "images.auto_update_interval": parse_int,
        "images.compression_algorithm": any_string,
        "images.default_architecture": any_string,
        "images.remote_cache_expiry": parse_int,
        # OpenID Connect (LXD 5.21's keys; croft.api.oidc applies them on the next request)
        "oidc.issuer": oidc.check_issuer,
        "oidc.client.id": oidc.check_token_field,
        "oidc.audience": oidc.check_token_field,
        "oidc.groups.claim": oidc.check_token_field,
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


def validate_instance_config(config: Mapping[str, str], *, profile: bool) -> None:
    """Instance (or, with `profile`, profile) config keys, as LXD checks them, through
    the one declaration of the keys (croft.common.instance_config).

    InvalidArgument carries LXD's bare message (`Unknown configuration key: foo.bar`,
    `Invalid CPU limit syntax`); the endpoints add LXD's context in front of it."""
    instance_config.validate(config, profile=profile)


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


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("Must be absolute file path")
    return value


def _network_name(value: str) -> str:
    # LXD's network names are URL path segments (its bridges' are interface names, which
    # the network service checks when one is made).
    if "/" in value:
        raise ValueError('Network name cannot contain "/"')
    return value


# Device options whose values croft checks, per device type (LXD's rules for these keys).
# Other options are not checked here beyond the rule for every value: no control
# characters, since compute writes some of them into LXC's line-based configuration.
_NIC_OPTIONS: Mapping[str, Validator] = {
    "name": instance_config.parse_interface_name,
    "host_name": instance_config.parse_interface_name,
    "parent": instance_config.parse_interface_name,
    "hwaddr": instance_config.parse_mac,
    "network": _network_name,
    "mtu": parse_int,
    "security.mac_filtering": parse_bool,
    "security.ipv4_filtering": parse_bool,
    "security.ipv6_filtering": parse_bool,
    "limits.ingress": instance_config.parse_bit_rate,
    "limits.egress": instance_config.parse_bit_rate,
    "limits.max": instance_config.parse_bit_rate,
}
_UNIX_OPTIONS: Mapping[str, Validator] = {"path": _absolute_path, "source": _absolute_path}
_DEVICE_OPTIONS: Mapping[str, Mapping[str, Validator]] = {
    "nic": _NIC_OPTIONS,
    "disk": {
        "path": _absolute_path,
        "readonly": parse_bool,
        "size": instance_config.parse_byte_size,
    },
    "unix-char": _UNIX_OPTIONS,
    "unix-block": _UNIX_OPTIONS,
}


def _check_options(kind: str, device: Mapping[str, str]) -> None:
    rules = _DEVICE_OPTIONS.get(kind, {})
    for key, value in device.items():
        if has_control(key):
            raise ValueError(f"Invalid device option {go_quote(key)}")
        if has_control(value):
            raise ValueError(
                f"Invalid value for device option {go_quote(key)}: control characters "
                "(line breaks, NUL...) are not allowed"
            )
        check = rules.get(key)
        if check is None or value == "":
            continue
        try:
            check(value)
        except ValueError as exc:
            raise ValueError(f"Invalid value for device option {go_quote(key)}: {exc}") from None
    if kind == "disk" and not device.get("pool") and device.get("path") != "/":
        # Without a pool, the source is a host path (a pool's is a volume's name).
        source = device.get("source", "")
        if source:
            try:
                _absolute_path(source)
            except ValueError as exc:
                raise ValueError(f'Invalid value for device option "source": {exc}') from None


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
    _check_options(kind, device)
    if kind == "disk":
        path, source, pool = device.get("path", ""), device.get("source", ""), device.get("pool")
        if path == "/":
            if not pool:
                raise ValueError('Root disk entry must have a "pool" property set')
        elif not source and not pool:
            raise ValueError('Disk entry is missing the required "source" or "path" property')
        elif not path and not pool:
            # LXD 5.0 accepts a container disk without a path and fails later; refuse it.
            # A custom volume may go without one: a block volume on a VM is a disk, not
            # a mount (compute refuses a filesystem volume without a path).
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
    """Devices (an instance's own, expanded, or a profile's), as LXD validates them, and
    no control character in any option or value. InvalidArgument with LXD's message;
    instance endpoints prefix `Invalid devices: `."""
    for name, device in devices.items():
        if not name:
            raise InvalidArgument("Device name cannot be empty")
        quoted = go_quote(name)  # Go's %q, as LXD: a name's line break stays escaped
        if len(name) > 64:
            raise InvalidArgument("The maximum device name length is 64 characters")
        try:
            instance_config.parse_device_name(name)
            _check_device(device)
        except _LoadError as exc:
            raise InvalidArgument(
                f"Device validation failed for {quoted}: Failed loading device {quoted}: {exc}"
            ) from None
        except ValueError as exc:
            raise InvalidArgument(f"Device validation failed for {quoted}: {exc}") from None
    roots = [
        name for name, d in devices.items() if d.get("type") == "disk" and d.get("path") == "/"
    ]
    if len(roots) > 1:
        raise InvalidArgument("Failed detecting root disk device: More than one root device found")
