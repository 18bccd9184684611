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
            time.sleep(5)
            pid = json.loads(lxc(env, "query", f"/1.0/instances/{name}/state").stdout)["pid"]
            rss = 0
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
            figures[f"QEMU RSS of an idle VM (limits.memory={args.memory}), MiB"] = round(
                rss / 2**20, 1
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
