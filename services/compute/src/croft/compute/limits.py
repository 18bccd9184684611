"""LXD's resource-limit keys (`limits.cpu`, `limits.memory`, `limits.processes`): parsing
their value formats and turning them into cgroup settings.

Parsing is strict and happens before anything is changed, so a bad value is an
InvalidArgument that leaves the instance as it was.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from croft.common.errors import InvalidArgument

LIMIT_KEYS = ("limits.cpu", "limits.memory", "limits.processes")

# LXD's ParseByteSizeString units: decimal (kB, MB...) and binary (KiB, MiB...).
_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "EB": 10**18,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "PiB": 2**50,
    "EiB": 2**60,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_CPUSET_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")

CFS_PERIOD_US = 100_000
_V1_RESETS = {
    ("memory.limit_in_bytes", "-1"),
    ("pids.max", "max"),
    ("cpu.cfs_period_us", str(CFS_PERIOD_US)),
    ("cpu.cfs_quota_us", "-1"),
}


def parse_byte_size(value: str, key: str = "size") -> int:
    """`64MiB`, `1GB`, `512` (bytes) -> bytes, as LXD parses sizes."""
    match = _SIZE_RE.match(value)
    if not match or match.group(2) not in _BYTE_UNITS:
        raise InvalidArgument(
            f'Invalid value for {key}: "{value}" (expected a size such as 64MiB or 1GB)'
        )
    number = float(match.group(1)) if "." in match.group(1) else int(match.group(1))
    return int(number * _BYTE_UNITS[match.group(2)])


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise InvalidArgument("cannot read the host's memory size from /proc/meminfo")


def parse_memory(value: str) -> int:
    """limits.memory: a size (`64MiB`, `1GB`) or a share of host memory (`50%`) -> bytes."""
    stripped = value.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise InvalidArgument(
                f'Invalid value for limits.memory: "{value}" (a percentage must be in (0, 100])'
            )
        return int(host_memory_bytes() * percent / 100)
    size = parse_byte_size(stripped, "limits.memory")
    if size <= 0:
        raise InvalidArgument(f'Invalid value for limits.memory: "{value}" (must be positive)')
    return size


@dataclass(frozen=True)
class CpuLimit:
    """limits.cpu: either a number of CPUs (`2`, enforced as a CFS quota) or a set of CPU
    ids (`0-1`, `0,2`, pinned with cpuset). LXD pins a count to N CPUs through its load
    balancer; without one a quota gives the same capacity without stacking every instance
    on CPU 0."""

    count: int | None = None
    cpuset: str | None = None


def parse_cpu(value: str) -> CpuLimit:
    stripped = value.strip()
    if stripped.isdigit():
        count = int(stripped)
        if count < 1:
            raise InvalidArgument(f'Invalid value for limits.cpu: "{value}" (must be at least 1)')
        return CpuLimit(count=count)
    if _CPUSET_RE.match(stripped):
        # "0-0" style singletons are what LXD writes to pin a single CPU.
        host_cpus = os.cpu_count() or 1
        for part in stripped.split(","):
            bounds = [int(b) for b in part.split("-")]
            if bounds[-1] < bounds[0] or bounds[-1] >= host_cpus:
                raise InvalidArgument(
                    f'Invalid value for limits.cpu: "{value}" (this host has CPUs 0-{host_cpus - 1})'
                )
        return CpuLimit(cpuset=stripped)
    raise InvalidArgument(
        f'Invalid value for limits.cpu: "{value}" (expected a CPU count such as 2 or a set such as 0-1)'
    )


def parse_processes(value: str) -> int:
    stripped = value.strip()
    if not stripped.isdigit() or int(stripped) < 1:
        raise InvalidArgument(
            f'Invalid value for limits.processes: "{value}" (expected a positive integer)'
        )
    return int(stripped)


@dataclass(frozen=True)
class Limits:
    """The parsed limits of an instance; None means unlimited."""

    memory_bytes: int | None = None
    cpu: CpuLimit | None = None
    processes: int | None = None


def parse_limits(config: dict[str, str]) -> Limits:
    """Parse the limits.* keys present in an LXD-style config (an empty value = unset)."""
    memory = config.get("limits.memory", "")
    cpu = config.get("limits.cpu", "")
    processes = config.get("limits.processes", "")
    return Limits(
        memory_bytes=parse_memory(memory) if memory else None,
        cpu=parse_cpu(cpu) if cpu else None,
        processes=parse_processes(processes) if processes else None,
    )


def cgroup_v1_items(limits: Limits, include_resets: bool = True) -> list[tuple[str, str]]:
    """The cgroup v1 files and values that enforce `limits`. With `include_resets`, unset
    limits are reset to unlimited (so applying the list to a running container also
    removes old limits); without, only the limits that are set (for a config file)."""
    all_cpus = f"0-{(os.cpu_count() or 1) - 1}"
    items = [
        ("memory.limit_in_bytes", str(limits.memory_bytes) if limits.memory_bytes else "-1"),
        ("pids.max", str(limits.processes) if limits.processes else "max"),
        ("cpu.cfs_period_us", str(CFS_PERIOD_US)),
    ]
    if limits.cpu and limits.cpu.count:
        items.append(("cpu.cfs_quota_us", str(limits.cpu.count * CFS_PERIOD_US)))
    else:
        items.append(("cpu.cfs_quota_us", "-1"))
    items.append(
        ("cpuset.cpus", limits.cpu.cpuset if limits.cpu and limits.cpu.cpuset else all_cpus)
    )
    resets = _V1_RESETS | {("cpuset.cpus", all_cpus)}
    return items if include_resets else [item for item in items if item not in resets]


def cgroup_v2_items(limits: Limits, include_resets: bool = True) -> list[tuple[str, str]]:
    """The same for a pure cgroup v2 host."""
    all_cpus = f"0-{(os.cpu_count() or 1) - 1}"
    quota = (
        f"{limits.cpu.count * CFS_PERIOD_US} {CFS_PERIOD_US}"
        if limits.cpu and limits.cpu.count
        else f"max {CFS_PERIOD_US}"
    )
    items = [
        ("memory.max", str(limits.memory_bytes) if limits.memory_bytes else "max"),
        ("pids.max", str(limits.processes) if limits.processes else "max"),
        ("cpu.max", quota),
        ("cpuset.cpus", limits.cpu.cpuset if limits.cpu and limits.cpu.cpuset else all_cpus),
    ]
    return items if include_resets else [item for item in items if item not in _v2_resets()]


def _v2_resets() -> set[tuple[str, str]]:
    return {
        ("memory.max", "max"),
        ("pids.max", "max"),
        ("cpu.max", f"max {CFS_PERIOD_US}"),
        ("cpuset.cpus", f"0-{(os.cpu_count() or 1) - 1}"),
    }
