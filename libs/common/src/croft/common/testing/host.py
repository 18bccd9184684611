"""What tests read back from the host to check what croft did: mounts, btrfs subvolumes,
the processes of one croft."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, read from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == str(path) or point.startswith(f"{path}/"):
                points.append(point)
    return points


def subvolume_show(path: Path) -> dict[str, str]:
    """`btrfs subvolume show`'s fields for the subvolume at `path` (fails if it is none)."""
    out = subprocess.run(
        ["btrfs", "subvolume", "show", str(path)], capture_output=True, text=True, check=True
    ).stdout
    fields = {}
    for line in out.splitlines()[1:]:
        key, _, value = line.strip().partition(":")
        fields[key.strip()] = value.strip()
    return fields


def croft_processes(config_file: Path, etcd_data: Path) -> list[int]:
    """Pids of every process of one croft (or one cluster member): those started with
    its config (`CROFT_CONFIG` in their environment), and etcd serving `etcd_data`."""
    mine = []
    marker = f"CROFT_CONFIG={config_file}".encode()
    data_dir = str(etcd_data).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") or data_dir in cmdline:
            mine.append(int(entry.name))
    return mine
