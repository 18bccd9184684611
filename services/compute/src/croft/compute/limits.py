"""LXD's resource-limit keys (`limits.cpu`, `limits.memory`, `limits.processes`) turned
into cgroup settings. Their values are parsed by their declaration in
croft.common.instance_config, the one the api validates with.

Parsing happens before anything is changed, so a bad value is an InvalidArgument that
leaves the instance as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from croft.common.errors import InvalidArgument
from croft.common.instance_config import CpuLimit, InstanceConfig

LIMIT_KEYS = ("limits.cpu", "limits.memory", "limits.processes")

CFS_PERIOD_US = 100_000
_V1_RESETS = {
    ("memory.limit_in_bytes", "-1"),
    ("pids.max", "max"),
    ("cpu.cfs_period_us", str(CFS_PERIOD_US)),
    ("cpu.cfs_quota_us", "-1"),
}


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise InvalidArgument("cannot read the host's memory size from /proc/meminfo")


@dataclass(frozen=True)
class Limits:
    """The parsed limits of an instance; None means unlimited."""

    memory_bytes: int | None = None
    cpu: CpuLimit | None = None
    processes: int | None = None


def parse_limits(config: dict[str, str]) -> Limits:
    """The limits.* keys of an LXD-style config (an empty value = unset), read through the
    keys' one declaration; what only this host can tell (its memory, its CPUs) is
    checked here."""
    cfg = InstanceConfig(config)
    memory = cfg.memory("limits.memory")
    memory_bytes = None
    if memory is not None:
        memory_bytes = memory.bytes
        if memory.percent is not None:
            memory_bytes = host_memory_bytes() * min(memory.percent, 100) // 100
    cpu = cfg.cpu("limits.cpu")
    if cpu is not None and cpu.cpus is not None:
        host_cpus = os.cpu_count() or 1
        if max(cpu.cpus) >= host_cpus:
            raise InvalidArgument(
                f'Invalid value for limits.cpu "{config["limits.cpu"]}": this host has '
                f"CPUs 0-{host_cpus - 1}"
            )
    return Limits(memory_bytes=memory_bytes, cpu=cpu, processes=cfg.int("limits.processes"))


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
