#!/usr/bin/env python3
"""Issue 18's flat-cost figure: 100 launches of busybox, 10 at a time, on one bridge on top
of 0, 500 and 1,000 running containers on that bridge, croft beside LXD 5.0.2.

    .venv/bin/python bench/scale.py --compare isolated /var/lib/lxd/unix.socket
    .venv/bin/python bench/scale.py --croft isolated --counts 0,100,200     # croft alone

Each daemon gets a bridge made for the run (`--subnet`, a /21 by default so that 1,100
containers get an address; `ipv6.address=none` on both, see bench/README.md), and every
container is launched with `-n` on it. For each count in `--counts` (ascending) the
running containers are topped up to that count, `--parallel` at a time (not timed), the
host settles, then one batch of `--batch` launches runs `--parallel` at a time (timed);
the batch is deleted before the next count. Figures per count: the batch's rate
(launches/s), host CPU per launch (`/proc/stat` busy time over the batch / launches),
and the CPU per launch of each process group that grows with the count: croft's
services one by one (the node's children, by module), etcd, dnsmasq of the bench bridge,
LXD's daemon. The rate at the last count over the rate at the first is the target
(at least 0.8).

A Linux bridge holds at most 1,023 ports (the kernel's BR_MAX_PORTS, 1,024 port numbers,
0 reserved; checked here with `ip link`): 1,000 running plus 100 launched cannot be on one
bridge, on croft or LXD, so the last count of the issue's run is 920 (`--counts
0,500,920`: its batch ends at 1,020 NICs).

Only what the script makes is touched: `isolated` is a croft of its own under a temporary
directory (bench/storage.py's), and on LXD every container is named `--prefix*` (default
`scl-`) and the bridge `--lxd-bridge`; all of them are deleted at the end, on failure and
on Ctrl-C. The host's load average is printed with the figures (a shared host).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import lxd
from launch import host_cpu_ms, parent_pid, settle
from lxd import BenchError, Daemon, run_parallel, say
from storage import isolated_croft

CLK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """ms of CPU of `pid` and of the children it reaped."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) * 1000 / CLK


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def groups(server_pid: int, bridge: str) -> dict[str, list[int]]:
    """The processes whose CPU is broken down: croft's node and its children by service
    (or LXD's one process), etcd, and the bench bridge's dnsmasq."""
    found: dict[str, list[int]] = defaultdict(list)
    node = parent_pid(server_pid)
    supervised = any("croft.node" in a for a in cmdline(node))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        with contextlib.suppress(OSError, IndexError, ValueError):
            argv = cmdline(pid)
            if not argv:
                continue
            if supervised and (pid == node or parent_pid(pid) == node):
                label = next(
                    (a.removeprefix("croft.") for a in argv if a.startswith("croft.")), None
                )
                label = label or os.path.basename(argv[0])
                found[label].append(pid)
            elif not supervised and pid == server_pid:
                found["lxd"].append(pid)
            elif os.path.basename(argv[0]) == "dnsmasq" and any(
                a == f"--interface={bridge}" for a in argv
            ):
                found["dnsmasq"].append(pid)
    return dict(found)


def cpu_of(found: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for label, pids in found.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                total += process_cpu(pid)
        out[label] = total
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Run:
    """One daemon's run: its bridge, its containers, its figures."""

    def __init__(self, daemon: Daemon, args: argparse.Namespace, bridge: str) -> None:
        self.daemon = daemon
        self.args = args
        self.bridge = bridge
        self.running: list[str] = []
        self.made = 0  # background names used (a failed launch's name is not reused)
        self.made_bridge = False

    def name(self, kind: str, i: int) -> str:
        return f"{self.args.prefix}{kind}{i:04d}"

    def launch(self, name: str) -> float | str:
        started = time.perf_counter()
        argv = ["lxc", "launch", lxd.IMAGE_ALIAS, name, "-n", self.bridge, "-s", self.args.pool]
        try:
            self.daemon.run(argv, timeout=self.args.launch_timeout)
        except BenchError as e:
            return str(e)
        except subprocess.TimeoutExpired:
            return f"{name}: no answer in {self.args.launch_timeout:g} s"
        return time.perf_counter() - started

    def mine(self) -> list[str]:
        return [n for n in self.daemon.instance_names() if n.startswith(self.args.prefix)]

    def delete_all(self) -> None:
        for _ in range(3):
            names = self.mine()
            if not names:
                break
            say(f"  {self.daemon.label}: deleting {len(names)} containers")
            self.daemon.delete(names, self.args.parallel)
        if self.made_bridge:
            self.daemon.lxc("network", "delete", self.bridge, check=False)

    def setup(self) -> None:
        self.daemon.lxc("list", "--format", "csv")
        if self.mine():
            raise BenchError(f"{self.daemon.label}: {self.args.prefix}* containers exist already")
        self.daemon.lxc("network", "create", self.bridge, f"ipv4.address={self.args.subnet}",
                        "ipv4.nat=true", "ipv6.address=none")  # fmt: skip
        self.made_bridge = True

    def top_up(self, count: int) -> None:
        first = self.made
        names = [self.name("bg", i) for i in range(first, first + count - len(self.running))]
        self.made += len(names)
        if not names:
            return
        started = time.perf_counter()
        outcomes = run_parallel(self.launch, names, self.args.parallel)
        failures = [o for o in outcomes if isinstance(o, str)]
        self.running += [n for n, o in zip(names, outcomes, strict=True) if not isinstance(o, str)]
        say(f"  {self.daemon.label}: {len(self.running)} running "
            f"(+{len(names) - len(failures)} in {time.perf_counter() - started:.0f} s)")  # fmt: skip
        for failure in failures[:3]:
            say(f"  background launch failed: {failure}")
        if len(failures) > len(names) // 20:
            raise BenchError(f"{len(failures)} background launches failed; first: {failures[0]}")

    def batch(self, count: int) -> dict[str, float]:
        server_pid = self.daemon.server_pid()
        if server_pid is None:
            raise BenchError(f"{self.daemon.label}: GET /1.0 reports no server_pid")
        names = [self.name(f"b{count}-", i) for i in range(self.args.batch)]
        settle(after_deletions=self.args.rest, busy_limit=0.3, timeout=30)
        found = groups(server_pid, self.bridge)
        load = loadavg()
        host0, procs0 = host_cpu_ms(), cpu_of(found)
        started = time.perf_counter()
        outcomes = run_parallel(self.launch, names, self.args.parallel)
        wall = time.perf_counter() - started
        host1, procs1 = host_cpu_ms(), cpu_of(found)
        samples = [o for o in outcomes if isinstance(o, float)]
        failures = [o for o in outcomes if isinstance(o, str)]
        per = max(1, len(samples))
        out = {
            "rate": len(samples) / wall,
            "host_cpu": (host1 - host0) / per,
            "launch_p50": lxd.p50(samples) * 1e3 if samples else 0.0,
            "failed": float(len(failures)),
        }
        for label in sorted(procs0):
            out[f"cpu.{label}"] = (procs1[label] - procs0[label]) / per
        breakdown = ", ".join(
            f"{k[4:]} {v:.1f}" for k, v in sorted(out.items()) if k.startswith("cpu.") and v >= 0.05
        )
        say(f"  {self.daemon.label} on {count}: {len(samples)}/{len(names)} in {wall:.1f} s = "
            f"{out['rate']:.2f}/s, host CPU {out['host_cpu']:.1f} ms/launch; "
            f"per launch ms: {breakdown}; load before {load}")  # fmt: skip
        for failure in failures[:3]:
            say(f"  launch failed: {failure}")
        out["load1"] = float(load.split()[0])
        self.daemon.delete(names, self.args.parallel)
        return out


def measure(daemon: Daemon, args: argparse.Namespace, bridge: str) -> dict[int, dict[str, float]]:
    run = Run(daemon, args, bridge)
    figures: dict[int, dict[str, float]] = {}
    try:
        run.setup()
        for count in args.counts:
            if args.stop_at and time.time() > args.stop_at:
                say(f"  {daemon.label}: --stop-at passed: no figure at {count} and above")
                break
            run.top_up(count)
            figures[count] = run.batch(count)
    except (BenchError, OSError) as e:
        say(f"  {daemon.label}: stopped: {e}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run.delete_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return figures


@contextlib.contextmanager
def croft_socket(where: str) -> Iterator[str]:
    if where == "isolated":
        with isolated_croft() as sock:
            yield sock
    else:
        yield where


def table(results: dict[str, dict[int, dict[str, float]]], counts: list[int]) -> None:
    print()
    print("| running | " + " | ".join(f"{d} rate | {d} host CPU/launch" for d in results) + " |")
    print("| --- |" + " --- | --- |" * len(results))
    for count in counts:
        cells = []
        for figures in results.values():
            f = figures.get(count)
            cells += [f"{f['rate']:.2f}/s", f"{f['host_cpu']:.0f} ms"] if f else ["-", "-"]
        print(f"| {count} | " + " | ".join(cells) + " |")
    for label, figures in results.items():
        if counts[0] in figures and counts[-1] in figures:
            first, last = figures[counts[0]], figures[counts[-1]]
            print(f"{label}: rate at {counts[-1]} / rate at {counts[0]} = "
                  f"{last['rate'] / first['rate']:.2f} (target >= 0.8); host CPU per launch "
                  f"{last['host_cpu'] / first['host_cpu']:.2f}x")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--croft", help="croft's unix socket, or `isolated`")
    parser.add_argument("--lxd", help="LXD's unix socket")
    parser.add_argument("--compare", nargs=2, metavar=("CROFT", "LXD"))
    parser.add_argument("--counts", default="0,500,1000")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--subnet", default="10.231.0.1/21")
    parser.add_argument("--pool", default="default")
    parser.add_argument("--prefix", default="scl-")
    parser.add_argument("--lxd-bridge", default="scllx0")
    parser.add_argument("--croft-bridge", default="sclcr0")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds after deletions")
    parser.add_argument("--image", help="busybox tarball where the alias is missing")
    parser.add_argument("--launch-timeout", type=float, default=300.0)
    parser.add_argument(
        "--stop-at", help="UTC HH:MM after which no further count is started (then cleanup)"
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    args.counts = sorted(int(c) for c in args.counts.split(","))
    if args.compare:
        args.croft, args.lxd = args.compare
    if args.stop_at:
        hour, minute = (int(x) for x in args.stop_at.split(":"))
        now = time.time()
        stop = now - now % 86400 + hour * 3600 + minute * 60
        args.stop_at = stop if stop > now - 3600 else stop + 86400
    signal.signal(signal.SIGTERM, lxd._interrupt)
    results: dict[str, dict[int, dict[str, float]]] = {}
    try:
        if args.croft:
            with croft_socket(args.croft) as sock:
                croft = Daemon("croft", sock)
                # the identical image on both: exported from LXD unless --image
                donor = Daemon("LXD", args.lxd or "/var/lib/lxd/unix.socket")
                lxd.ensure_images([croft, donor], args.image)
                results["croft"] = measure(croft, args, args.croft_bridge)
        if args.lxd:
            daemon = Daemon("LXD", args.lxd)
            lxd.ensure_images([daemon], args.image)
            results["LXD"] = measure(daemon, args, args.lxd_bridge)
    except KeyboardInterrupt:
        say("interrupted")
    except (BenchError, OSError) as e:  # a daemon that does not answer
        say(f"stopped: {e}")
    table(results, args.counts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {str(c): v for c, v in r.items()} for k, r in results.items()}, f)
    return 0 if all(len(r) == len(args.counts) for r in results.values()) and results else 1


if __name__ == "__main__":
    sys.exit(main())
