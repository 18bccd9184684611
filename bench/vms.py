#!/usr/bin/env python3
"""VM figures (issue 17) against an LXD-compatible unix socket, with the stock `lxc` client:
boot to agent ready (`lxc launch --vm` until `lxc exec true` answers), exec round trip,
the QEMU process's memory for an idle VM, clean (ACPI) and forced stop. Stdlib only; run
as root with `/usr/bin/python3 bench/vms.py --socket /var/lib/croft/unix.socket`.

The image: `--image ALIAS` (default tiny-vm), imported first from `--meta`/`--rootfs` when
the alias is missing (`make images` builds them); `--debian` picks the Debian 12 UEFI image
(debian-12-vm: OVMF with secure boot, GRUB, systemd; 1GiB). LXD 5.0.2 cannot start VMs on a host
without vsock (this one): pointed at LXD, the script reports its refusal as the anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def lxc(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["lxc", *args], env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise RuntimeError(f"lxc {' '.join(args)}: {result.stderr.strip()}")
    return result


def parse_size(text: str) -> int:
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


def qemu_memory(pid: int, guest_ram: int) -> tuple[int, int, int]:
    """(resident bytes of the QEMU process, resident bytes of its guest-RAM mapping, its
    anonymous resident bytes outside that mapping): the guest-RAM mapping is the one
    anonymous region exactly the size of the guest's RAM. File-backed pages (the kernel
    and initrd QEMU keeps mapped, its own binary) are page cache, shared by every VM of the
    same image and reclaimable; the anonymous rest is what this VM alone costs."""
    total = guest = anonymous = 0
    size = rss = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Size":
            size = int(value.split()[0]) * 1024
        elif key == "Rss":
            rss = int(value.split()[0]) * 1024
            total += rss
            if size == guest_ram:
                guest += rss
        elif key == "Anonymous" and size != guest_ram:
            anonymous += int(value.split()[0]) * 1024
    return total, guest, anonymous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/var/lib/croft/unix.socket")
    parser.add_argument("--image", default="tiny-vm")
    parser.add_argument("--meta", default="/var/lib/croft/build-images/tiny-vm.meta.tar.gz")
    parser.add_argument("--rootfs", default="/var/lib/croft/build-images/tiny-vm.rootfs.img")
    parser.add_argument("--runs", type=int, default=3, help="boots to time")
    parser.add_argument("--execs", type=int, default=20)
    parser.add_argument("--memory", default="256MiB")
    parser.add_argument("--debian", action="store_true", help="the Debian 12 UEFI VM image")
    args = parser.parse_args()
    if args.debian:
        built = "/var/lib/croft/build-images/debian-12-vm"
        args.image, args.meta, args.rootfs = (
            "debian-12-vm",
            f"{built}.meta.tar.xz",
            f"{built}.rootfs.img",
        )
        args.memory = "1GiB"
    env = {**os.environ, "LXD_DIR": str(Path(args.socket).parent)}
    aliases = [
        a["name"] for a in json.loads(lxc(env, "image", "alias", "list", "--format", "json").stdout)
    ]
    if args.image not in aliases:
        lxc(env, "image", "import", args.meta, args.rootfs, "--alias", args.image)
    figures: dict[str, object] = {}
    boots, stops_clean, stops_force = [], [], []
    for run in range(args.runs):
        name = f"benchvm{run}"
        started = time.monotonic()
        result = lxc(
            env,
            "launch",
            args.image,
            name,
            "--vm",
            "-c",
            f"limits.memory={args.memory}",
            check=False,
        )
        if result.returncode != 0:
            print(f"launch refused: {result.stderr.strip()}")
            return 1
        while lxc(env, "exec", name, "--", "true", check=False).returncode != 0:
            time.sleep(0.1)
        boots.append(time.monotonic() - started)
        if run == 0:
            rtts = []
            for _ in range(args.execs):
                t = time.monotonic()
                lxc(env, "exec", name, "--", "true")
                rtts.append(time.monotonic() - t)
            figures["exec round trip (lxc exec true), median ms"] = round(
                statistics.median(rtts) * 1000, 1
            )
            # What the client and one API request cost without an exec: the floor of any
            # `lxc` command against this server.
            floor = []
            for _ in range(args.execs):
                t = time.monotonic()
                lxc(env, "query", "/1.0")
                floor.append(time.monotonic() - t)
            figures["  lxc query /1.0 (client start + one request), median ms"] = round(
                statistics.median(floor) * 1000, 1
            )
            time.sleep(5)
            pid = json.loads(lxc(env, "query", f"/1.0/instances/{name}/state").stdout)["pid"]
            total, guest, anonymous = qemu_memory(pid, parse_size(args.memory))
            figures[f"QEMU RSS of an idle VM (limits.memory={args.memory}), MiB"] = round(
                total / 2**20, 1
            )
            figures["  of which guest RAM touched, MiB"] = round(guest / 2**20, 1)
            figures["  beyond guest RAM, all resident (file pages shared), MiB"] = round(
                (total - guest) / 2**20, 1
            )
            figures["host memory beyond guest RAM, anonymous (target < 64), MiB"] = round(
                anonymous / 2**20, 1
            )
        t = time.monotonic()
        lxc(env, "stop", name)
        stops_clean.append(time.monotonic() - t)
        lxc(env, "start", name)
        while lxc(env, "exec", name, "--", "true", check=False).returncode != 0:
            time.sleep(0.1)
        t = time.monotonic()
        lxc(env, "stop", name, "--force")
        stops_force.append(time.monotonic() - t)
        lxc(env, "delete", name)
    figures["launch --vm to agent ready, median s"] = round(statistics.median(boots), 2)
    figures["lxc stop (ACPI), median s"] = round(statistics.median(stops_clean), 2)
    figures["lxc stop --force, median s"] = round(statistics.median(stops_force), 2)
    for key, value in figures.items():
        print(f"{key:60} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
