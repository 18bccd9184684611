"""Host settings the compute service needs for speed.

Every exec and every start moves a process into the container's cgroups. The kernel guards
migrations with a per-cpu rw-semaphore whose writers wait for an RCU grace period, unless
the cgroup2 hierarchy is mounted with `favordynmods` (Linux 6.0+), which keeps the
semaphore in its writer-friendly mode at a small cost to fork and exit. On this machine,
`lxc exec true` takes 24 ms with it and 41 ms without (bench/README.md). The option is
global to the kernel: one cgroup2 mount with it covers the v1 hierarchies of a hybrid host
too. A mount option does not survive a reboot, so the service sets it at every start.
"""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)

OPTION = "favordynmods"


def cgroup2_mounts(mounts: str = "/proc/self/mounts") -> list[tuple[str, list[str]]]:
    """(mount point, options) of every cgroup2 mount."""
    found: list[tuple[str, list[str]]] = []
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup2":
                found.append((fields[1].replace("\\040", " "), fields[3].split(",")))
    return found


def favor_cgroup_migrations(mounts: str = "/proc/self/mounts") -> bool:
    """Remount the first cgroup2 hierarchy with `favordynmods` unless one has it already.
    True when the option is in effect; a host that refuses it (an older kernel, no cgroup2
    mount) keeps working, only slower."""
    found = cgroup2_mounts(mounts)
    if any(OPTION in options for _, options in found):
        return True
    if not found:
        log.info("no cgroup2 mount: cgroup migrations stay on the slow path")
        return False
    target = found[0][0]
    result = subprocess.run(
        ["mount", "-o", f"remount,{OPTION}", target], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        log.warning(
            "could not remount %s with %s (%s): exec and start stay slower",
            target,
            OPTION,
            result.stderr.strip() or f"exit {result.returncode}",
        )
        return False
    log.info("remounted %s with %s: fast cgroup migrations", target, OPTION)
    return True
