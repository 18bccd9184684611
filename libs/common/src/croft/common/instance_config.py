"""Instance (and profile) config keys, declared once: LXD 5.0's names, each with its type,
default, parser and whether a change applies to a running instance.

The api validates a request with `validate()`; compute reads typed values through
`InstanceConfig` (`cfg.bool("security.privileged")`, `cfg.memory("limits.memory")`), so
the two can never read one value two ways. The parsers are LXD's: `parse_bool` is
`shared.IsTrue`/`IsFalse`, `parse_byte_size` is `units.ParseByteSizeString`,
`parse_cpuset` is `validate.IsValidCPUSet`; their ValueError messages are LXD's words.

No value of a key that is not free text may hold a control character (a line break, NUL,
...): values end up in files written line by line (the LXC definition), and a line break
there would start a key of its own.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from croft.common.errors import InvalidArgument
from croft.common.schedule import CronSchedule, parse_expiry

# -- parsers: each returns the typed value or raises ValueError with LXD's message ---------

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Patterns below are used with fullmatch(): `$` alone would let a trailing newline through.
_GO_INT = re.compile(r"^[+-]?[0-9]+$")
_INT64 = (-(2**63), 2**63 - 1)


def go_quote(value: str) -> str:
    """`value` quoted as Go's %q does: control characters escaped, so that a message
    never carries a raw line break."""
    return json.dumps(value, ensure_ascii=False)


def has_control(value: str) -> bool:
    """Whether `value` holds a control character (line breaks, tab, NUL, DEL...)."""
    return _CONTROL.search(value) is not None


def parse_bool(value: str) -> bool:
    """LXD's booleans, any case: true/1/yes/on and false/0/no/off."""
    word = value.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"Invalid value for a boolean {go_quote(value)}")


def parse_int(value: str) -> int:
    """A signed 64-bit integer, as Go's strconv.ParseInt(value, 10, 64) reads it (no
    spaces, no underscores, which Python's int() would take)."""
    if not _GO_INT.fullmatch(value) or not _INT64[0] <= int(value) <= _INT64[1]:
        raise ValueError(f"Invalid value for an integer {go_quote(value)}")
    return int(value)


def int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = parse_int(value)
        if not low <= number <= high:
            raise ValueError(f"Value must be between {low} and {high}")
        return number

    return parse


def parse_priority(value: str) -> int:
    """LXD's `limits.*.priority`: an integer 0-10."""
    number = parse_int(value)
    if not 0 <= number <= 10:
        raise ValueError(f"Invalid value for a limit {go_quote(value)}. Must be between 0 and 10")
    return number


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            # LXD prints the choices as a Go slice: [soft hard].
            raise ValueError(f"Invalid value {go_quote(value)} (not one of [{' '.join(choices)}])")
        return value

    return parse


def any_string(value: str) -> str:
    return value


def parse_snapshot_schedule(value: str) -> str:
    """A cron expression or LXD's aliases (`croft.common.schedule`), in LXD's words."""
    if value:
        try:
            CronSchedule.parse(value)
        except ValueError:
            raise ValueError(
                "Schedule must be of the form: <minute> <hour> <day-of-month> <month> <day-of-week>"
            ) from None
    return value


def parse_snapshot_expiry(value: str) -> str:
    try:
        parse_expiry(value)
    except ValueError:
        raise ValueError("Invalid expiry expression") from None
    return value


_BYTE_UNITS: dict[str, int] = {
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


def parse_byte_size(value: str) -> int:
    """Bytes in a size, as LXD's `units.ParseByteSizeString` reads it: an integer and one
    of its exact suffixes (`512MiB`, `2GB`, `100`, `100B`, `100 bytes`); no decimals, no
    other spaces. Empty is 0."""
    if value == "":
        return 0
    digits = len(value) - len(value.lstrip("0123456789"))
    if digits == 0:
        raise ValueError(f"Invalid value: {value}")
    suffix = value[digits:]
    if suffix not in _BYTE_UNITS:
        raise ValueError(f"Invalid value: {value}")
    size = int(value[:digits]) * _BYTE_UNITS[suffix]
    if size > _INT64[1]:
        raise ValueError(f"Invalid integer: {value}")
    return size


_CPUSET_SYNTAX = re.compile(r"^([0-9]+([,-][0-9]+)?)(,[0-9]+([,-][0-9]+)*)?$")


_BIT_UNITS: dict[str, int] = {
    "": 1,
    "bit": 1,
    **{f"{p}bit": 1000 ** (i + 1) for i, p in enumerate("kMGTPE")},
    **{f"{p}ibit": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")},
}


def parse_bit_rate(value: str) -> int:
    """LXD's `units.ParseBitSizeString` (a NIC's `limits.ingress`...): bits per second
    from `100Mbit`, `1Gibit`, `800`."""
    digits = len(value) - len(value.lstrip("0123456789"))
    if digits == 0:
        raise ValueError(f"Invalid value: {value}")
    suffix = value[digits:]
    if suffix not in _BIT_UNITS:
        raise ValueError(f"Invalid value: {value}")
    return int(value[:digits]) * _BIT_UNITS[suffix]


def parse_cpuset(value: str) -> tuple[int, ...]:
    """The CPU ids of a set such as `0-3,6`, as LXD's `IsValidCPUSet` checks it: no id
    twice, ranges low to high."""
    if not _CPUSET_SYNTAX.fullmatch(value):
        raise ValueError("Invalid CPU limit syntax")
    cpus: list[int] = []
    for chunk in value.split(","):
        low, _, high = chunk.partition("-")
        if "-" in high or int(high or low) < int(low):
            # LXD lets "3-1" through as no CPU at all; croft refuses it.
            raise ValueError(f"Invalid cpuset value: {value}")
        cpus += range(int(low), int(high or low) + 1)
    if len(set(cpus)) != len(cpus):
        raise ValueError("Cannot define CPU multiple times")
    return tuple(cpus)


@dataclass(frozen=True)
class CpuLimit:
    """`limits.cpu`: a number of CPUs (`2`) or a set of CPU ids (`0-1`, `0,2`, `1-1`)."""

    count: int | None = None
    cpus: tuple[int, ...] | None = None
    cpuset: str | None = None  # the set as written, for cgroup's cpuset.cpus


def parse_cpu_limit(value: str) -> CpuLimit:
    cpus = parse_cpuset(value)
    if value.isdigit():
        # A plain number is a count, as in LXD; 0 CPUs cannot run anything.
        if int(value) < 1:
            raise ValueError("A CPU limit must be at least 1 CPU")
        return CpuLimit(count=int(value))
    return CpuLimit(cpus=cpus, cpuset=value)


@dataclass(frozen=True)
class MemoryLimit:
    """`limits.memory`: bytes, or a percentage of the host's memory."""

    bytes: int | None = None
    percent: int | None = None


def parse_memory_limit(value: str) -> MemoryLimit:
    if value.endswith("%"):
        number = value[:-1]
        if not _GO_INT.fullmatch(number):
            # LXD passes Go's strconv error through unchanged.
            raise ValueError(f"strconv.ParseInt: parsing {go_quote(number)}: invalid syntax")
        percent = int(number)
        if percent == 0:
            raise ValueError("Memory limit can't be 0%")
        if percent < 0:
            raise ValueError("Memory limit can't be negative")
        return MemoryLimit(percent=percent)
    size = parse_byte_size(value)
    if size == 0:
        raise ValueError("Memory limit can't be 0")
    return MemoryLimit(bytes=size)


def parse_processes(value: str) -> int:
    number = parse_int(value)
    if number < 1:
        # LXD would write pids.max=0: an instance that cannot start a process.
        raise ValueError("A process limit must be at least 1")
    return number


_ALLOWANCE = re.compile(r"[0-9]+%|[0-9]+ms/[0-9]+ms")


def parse_cpu_allowance(value: str) -> str:
    if not _ALLOWANCE.fullmatch(value):
        raise ValueError(f"Invalid allowance: {value}")
    return value


_RAW_LXC_NET = re.compile(r"^lxc\.net\.[^.]+\.ipv[46]\.(address|gateway)$")


def parse_raw_lxc(value: str) -> str:
    """`raw.lxc`: LXC configuration lines, checked as LXD's `lxcValidConfig` does (each a
    `key = value`, a comment or blank; no key that would take a log, the lifetime, the
    process limits or the NICs from croft). No CR or NUL, which liblxc reads otherwise
    than a line's end."""
    if "\r" in value or "\x00" in value:
        raise ValueError("raw.lxc cannot contain a carriage return or NUL")
    for raw_line in value.split("\n"):
        line = raw_line.lstrip("\t ")
        if not line or line.startswith("#"):
            continue
        key, sep, _ = line.partition("=")
        if not sep:
            raise ValueError(f"Invalid raw.lxc line: {line}")
        key = key.strip(" \t").lower()
        if key in ("lxc.logfile", "lxc.log.file"):
            raise ValueError("Setting lxc.logfile is not allowed")
        if key in ("lxc.syslog", "lxc.log.syslog"):
            raise ValueError("Setting lxc.log.syslog is not allowed")
        if key == "lxc.ephemeral":
            raise ValueError("Setting lxc.ephemeral is not allowed")
        if key.startswith("lxc.prlimit."):
            raise ValueError(
                'Process limits should be set via "limits.kernel.[limit name]" and not '
                'directly via "lxc.prlimit.[limit name]"'
            )
        if key.startswith("lxc.net.") and not _RAW_LXC_NET.fullmatch(key):
            raise ValueError("Only interface-specific ipv4/ipv6 lxc.net. keys are allowed")
    return value


# -- the keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: `parse` turns a value into `type` (raising ValueError with LXD's
    message); `default` is what an unset key means; `live` says a change reaches a
    running instance (else at its next start); `text` marks free text (cloud-init data,
    user keys, raw.*) that may span lines."""

    type: str
    parse: Callable[[str], object]
    default: str = ""
    live: bool = False
    text: bool = False

    def validate(self, value: str) -> None:
        if not self.text and has_control(value):
            raise ValueError(
                f"Invalid value {go_quote(value)}: control characters (line breaks, NUL...) "
                "are not allowed"
            )
        self.parse(value)


def _bool(default: str = "false", live: bool = False) -> Key:
    return Key("bool", parse_bool, default=default, live=live)


_INT = Key("int", parse_int)
_STRING = Key("string", any_string)
_TEXT = Key("string", any_string, text=True)
_PRIORITY = Key("int", parse_priority)

KEYS: Mapping[str, Key] = {
    "boot.autostart": Key("bool", parse_bool, live=True),  # unset: "if it was running"
    "boot.autostart.delay": Key("int", parse_int, default="0", live=True),
    "boot.autostart.priority": Key("int", parse_int, default="0", live=True),
    "boot.host_shutdown_timeout": Key("int", parse_int, default="30", live=True),
    "boot.stop.priority": Key("int", parse_int, default="0", live=True),
    "cloud-init.network-config": _TEXT,
    "cloud-init.user-data": _TEXT,
    "cloud-init.vendor-data": _TEXT,
    "cluster.evacuate": Key("string", one_of("auto", "migrate", "stop"), default="auto"),
    "limits.cpu": Key("cpu", parse_cpu_limit, live=True),
    "limits.cpu.allowance": Key("string", parse_cpu_allowance),
    "limits.cpu.priority": _PRIORITY,
    "limits.disk.priority": _PRIORITY,
    "limits.memory": Key("memory", parse_memory_limit, live=True),
    "limits.memory.enforce": Key("string", one_of("soft", "hard"), default="hard"),
    "limits.memory.swap": _bool("true"),
    "limits.memory.swap.priority": _PRIORITY,
    "limits.network.priority": _PRIORITY,
    "limits.processes": Key("int", parse_processes, live=True),
    "linux.kernel_modules": _STRING,
    "migration.incremental.memory": _bool(),
    "migration.stateful": _bool(),
    "nvidia.driver.capabilities": _STRING,
    "nvidia.require.cuda": _STRING,
    "nvidia.require.driver": _STRING,
    "nvidia.runtime": _bool(),
    "raw.apparmor": _TEXT,
    "raw.idmap": _TEXT,
    # LXC configuration lines, appended to the definition: the one key meant to hold it.
    "raw.lxc": Key("string", parse_raw_lxc, text=True),
    "raw.qemu": _TEXT,
    "raw.seccomp": _TEXT,
    "security.devlxd": _bool("true"),
    "security.devlxd.images": _bool(),
    "security.idmap.base": _INT,
    "security.idmap.isolated": _bool(),
    "security.idmap.size": _INT,
    "security.nesting": _bool(),
    "security.privileged": _bool(),
    "security.protection.delete": _bool(live=True),
    "security.protection.shift": _bool(),
    "security.secureboot": _bool("true"),
    "security.syscalls.allow": _STRING,
    "security.syscalls.deny": _STRING,
    "security.syscalls.deny_compat": _bool(),
    "security.syscalls.deny_default": _bool("true"),
    "security.syscalls.intercept.bpf": _bool(),
    "security.syscalls.intercept.bpf.devices": _bool(),
    "security.syscalls.intercept.mknod": _bool(),
    "security.syscalls.intercept.mount": _bool(),
    "security.syscalls.intercept.mount.allowed": _STRING,
    "security.syscalls.intercept.mount.fuse": _STRING,
    "security.syscalls.intercept.mount.shift": _bool(),
    "security.syscalls.intercept.setxattr": _bool(),
    "snapshots.expiry": Key("string", parse_snapshot_expiry),
    "snapshots.pattern": Key("string", any_string, default="snap%d"),
    "snapshots.schedule": Key("string", parse_snapshot_schedule),
    "snapshots.schedule.stopped": _bool(),
}

# Keys under these prefixes take any suffix.
PREFIXES: Mapping[str, Key] = {
    "user.": _TEXT,
    "environment.": _STRING,
    "image.": _TEXT,
    "limits.kernel.": _STRING,
    "limits.hugepages.": Key("size", parse_byte_size),
    "linux.sysctl.": _STRING,
}

# LXD 5.0's volatile keys: these exact ones, and `volatile.<device>.<suffix>`. compute
# writes them; a client may send them back (as LXD allows), never on a profile.
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
_VOLATILE = Key("string", any_string)


def _known_volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or (key.count(".") >= 2 and key.endswith(VOLATILE_DEVICE_SUFFIXES))


def lookup(key: str) -> Key | None:
    """The declaration of `key`, None for a key croft does not know."""
    found = KEYS.get(key)
    if found is not None:
        return found
    if key.startswith("volatile."):
        return _VOLATILE if _known_volatile(key) else None
    for prefix, declared in PREFIXES.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            return declared
    return None


def validate(config: Mapping[str, str], *, profile: bool) -> None:
    """Instance (or, with `profile`, profile) config, as LXD checks it. InvalidArgument
    carries LXD's bare message (`Unknown configuration key: foo.bar`, `Invalid CPU limit
    syntax`); the api adds LXD's context in front of it."""
    for key, value in config.items():
        if has_control(key):
            raise InvalidArgument(
                f"Invalid configuration key {go_quote(key)}: control characters are not allowed"
            )
        if profile and key.startswith("volatile."):
            raise InvalidArgument("Volatile keys can only be set on instances")
        declared = lookup(key)
        if declared is None:
            raise InvalidArgument(f"Unknown configuration key: {key}")
        try:
            declared.validate(value)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None


# -- typed reads ------------------------------------------------------------------------


class InstanceConfig:
    """Typed reads of an instance's (expanded) config through the declarations above.
    An unset or empty key reads as its default. A stored value that does not parse (a
    record written before a check existed) is an InvalidArgument naming the key."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values

    def _parsed(self, key: str, want: str) -> object:
        declared = lookup(key)
        if declared is None or declared.type != want:
            raise KeyError(f"{key} is not a declared {want} key")  # a bug in the caller
        value = self.values.get(key) or declared.default
        if value == "":
            return None
        try:
            return declared.parse(value)
        except ValueError as exc:
            raise InvalidArgument(f"Invalid value for {key} {go_quote(value)}: {exc}") from None

    def is_set(self, key: str) -> builtins.bool:
        return bool(self.values.get(key))

    def bool(self, key: str) -> builtins.bool:
        return self._parsed(key, "bool") is True

    def int(self, key: str) -> builtins.int | None:
        value = self._parsed(key, "int")
        return value if isinstance(value, builtins.int) else None

    def size(self, key: str) -> builtins.int | None:
        value = self._parsed(key, "size")
        return value if isinstance(value, builtins.int) else None

    def cpu(self, key: str = "limits.cpu") -> CpuLimit | None:
        value = self._parsed(key, "cpu")
        return value if isinstance(value, CpuLimit) else None

    def memory(self, key: str = "limits.memory") -> MemoryLimit | None:
        value = self._parsed(key, "memory")
        return value if isinstance(value, MemoryLimit) else None

    def string(self, key: str) -> str:
        value = self._parsed(key, "string")
        return value if isinstance(value, str) else ""


# -- device values (validated by the api, relied on by compute) --------------------------

_INTERFACE_NAME = re.compile(r"^[-_a-zA-Z0-9.]+$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_DEVICE_NAME = re.compile(r"^[/.\-:_a-zA-Z0-9]+$")


def parse_interface_name(value: str) -> str:
    """A network interface name, as LXD's `validate.IsInterfaceName` checks it."""
    if len(value) < 2:
        raise ValueError("Network interface is too short (minimum 2 characters)")
    if len(value) > 15:
        raise ValueError("Network interface is too long (maximum 15 characters)")
    if not _INTERFACE_NAME.fullmatch(value):
        raise ValueError("Network interface contains invalid characters")
    return value


def parse_mac(value: str) -> str:
    """An Ethernet MAC (`00:16:3e:01:02:03`), as LXD's `validate.IsNetworkMAC` checks it."""
    if not _MAC.fullmatch(value):
        raise ValueError("Invalid MAC address, must be 6 bytes of hex separated by colons")
    return value


def parse_device_name(value: str) -> str:
    """A device name, as LXD 5.0's `validate.IsDeviceName` checks it."""
    if not 1 <= len(value) <= 63:
        raise ValueError("Name must be 1-63 characters long")
    if value.startswith("."):
        raise ValueError('Name must not start with "." character')
    if not _DEVICE_NAME.fullmatch(value):
        raise ValueError(
            "Name can only contain alphanumeric, forward slash, hyphen, colon, underscore "
            "and full stop characters"
        )
    return value
