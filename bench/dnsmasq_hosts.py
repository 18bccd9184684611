#!/usr/bin/env python3
"""What a new NIC costs dnsmasq on a bridge that already has N NICs (issue 18's flat-cost
item): dnsmasq's own CPU per new `dhcp-hostsdir` file (croft's and LXD 5.0.2's way of
naming a NIC), with N host files and N leases already there.

    python3 bench/dnsmasq_hosts.py [--counts 0,500,1000] [--files 50]

A dnsmasq with croft's options (`_bridge_dnsmasq.Dnsmasq.argv`'s: DNS on, quiet DHCP)
serves a bridge made for the run (no instance on it: only the files change); each
variant writes `--files` new files one at a time, 50 ms apart, and reads dnsmasq's CPU
(utime+stime) before and after. Variants, to find which part grows:

  hosts      N host files, N leases, a new dhcp-host file (what a launch does)
  no-leases  N host files, no lease
  no-dns     N leases, a new dhcp-host file, DNS off (`--port=0`)
  names      N `--hostsdir` name files and N leases, a new name file (DNS only)

Stdlib only; run as root. The bridge and files are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

CLK = os.sysconf("SC_CLK_TCK")


def mac(i: int) -> str:
    return f"00:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"


def ip(i: int) -> str:
    return f"10.250.{(i + 2) // 256}.{(i + 2) % 256}"


def cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK


def measure(n: int, variant: str, files: int) -> float:
    root = tempfile.mkdtemp(prefix="bench-dnsmasq-")
    os.chmod(root, 0o755)
    hosts, names = os.path.join(root, "hosts"), os.path.join(root, "names")
    os.mkdir(hosts)
    os.mkdir(names)
    bridge = "bdq" + secrets.token_hex(3)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    proc = None
    try:
        subprocess.run(["ip", "addr", "add", "10.250.0.1/21", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        expiry = int(time.time()) + 3600
        with open(os.path.join(root, "leases"), "w") as f:
            for i in range(0 if variant == "no-leases" else n):
                f.write(f"{expiry} {mac(i)} {ip(i)} c{i} *\n")
        for i in range(n):
            if variant == "names":
                with open(os.path.join(names, str(i)), "w") as f:
                    f.write(f"{ip(i)} c{i}.lxd c{i}\n")
            elif variant != "no-dns":
                with open(os.path.join(hosts, str(i)), "w") as f:
                    f.write(f"{mac(i)},c{i}\n")
        argv = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--strict-order",
            "--bind-interfaces", "--except-interface=lo", f"--interface={bridge}",
            "--listen-address=10.250.0.1", f"--pid-file={root}/pid",
            f"--log-facility={root}/log", "--quiet-dhcp", "--no-ping", "--no-negcache",
            "--no-hosts", "--dhcp-rapid-commit", "--dhcp-no-override", "--dhcp-authoritative",
            f"--dhcp-leasefile={root}/leases", f"--dhcp-hostsdir={hosts}",
            f"--hostsdir={names}", "--dhcp-range=10.250.0.2,10.250.7.254,1h",
        ]  # fmt: skip
        argv += ["--port=0"] if variant == "no-dns" else ["--domain=lxd", "--local=/lxd/"]
        proc = subprocess.Popen(argv)
        time.sleep(2)
        before = cpu_ms(proc.pid)
        for j in range(files):
            i = n + j
            directory, line = (
                (names, f"{ip(i)} c{i}.lxd c{i}\n")
                if variant == "names"
                else (hosts, f"{mac(i)},c{i}\n")
            )
            tmp = os.path.join(directory, ".tmp")
            with open(tmp, "w") as f:
                f.write(line)
            os.replace(tmp, os.path.join(directory, str(i)))
            time.sleep(0.05)
        time.sleep(1)
        return (cpu_ms(proc.pid) - before) / files
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        subprocess.run(["ip", "link", "del", bridge], check=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,500,1000")
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--variants", default="hosts,no-leases,no-dns,names")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    variants = args.variants.split(",")
    print("| N | " + " | ".join(variants) + " |")
    print("| --- |" + " --- |" * len(variants))
    for n in counts:
        cells = [f"{measure(n, v, args.files):.1f} ms" for v in variants]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
