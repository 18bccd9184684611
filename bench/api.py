#!/usr/bin/env python3
"""REST latency of an LXD-compatible daemon with N running busybox instances (default 100):
GET /1.0 and GET /1.0/instances?recursion=1 from this process on a fresh unix connection
per request (the anchor's "in-proc" figures), the same through `curl --unix-socket`, and
`lxc list` (which asks for recursion=2).

    python3 bench/api.py --socket /var/lib/lxd/unix.socket
    python3 bench/api.py --compare /var/lib/croft/unix.socket /var/lib/lxd/unix.socket

bench/launch.py reports the same figures inside its density phase, so its run is the full
issue-3 table; this script is the quick way to look at the API alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import lxd
from lxd import BenchError, Daemon, Figures, Phase, describe, p50, p95, say

API_KEYS = ("api_root", "api_instances", "api_instances_p95", "curl_instances", "lxc_list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rest-runs", type=int, default=30, help="requests per figure")
    parser.add_argument("--no-curl", action="store_true", help="skip the curl figure")


def timed_curl(daemon: Daemon, path: str) -> float:
    argv = ["curl", "-sf", "-o", "/dev/null", "--unix-socket", daemon.socket, "http://lxd" + path]
    started = time.perf_counter()
    if subprocess.run(argv, capture_output=True).returncode != 0:
        raise BenchError(f"{daemon.label}: `{' '.join(argv)}` failed")
    return time.perf_counter() - started


def measure_api(daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    """The API figures against whatever instances the daemon has now."""
    runs = args.rest_runs
    count = len(daemon.instance_names())
    say(f"  REST latency with {count} instances")
    if count != 100:
        say(f"  note: issue 3's API figures are with 100 instances; the table's are with {count}")
    for key, path in (("api_root", "/1.0"), ("api_instances", "/1.0/instances?recursion=1")):
        daemon.timed_get(path)  # the daemon's first answer may fill caches
        samples = [daemon.timed_get(path) for _ in range(runs)]
        say(f"  in-proc GET {path:30} {describe(samples)} ms")
        out[key] = p50(samples) * 1e3
        if key == "api_instances":
            out["api_instances_p95"] = p95(samples) * 1e3
    if not args.no_curl:
        path = "/1.0/instances?recursion=1"
        samples = [timed_curl(daemon, path) for _ in range(runs)]
        say(f"  curl GET {path:33} {describe(samples)} ms")
        out["curl_instances"] = p50(samples) * 1e3
    samples = [daemon.timed_lxc("list", "--format", "csv") for _ in range(max(3, runs // 6))]
    say(f"  lxc list{'':35} {describe(samples)} ms")
    out["lxc_list"] = p50(samples) * 1e3


def api_phase(daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    names = [f"{lxd.PREFIX}api{i:03d}" for i in range(args.instances)]
    wall, _, failures = lxd.launch_many(daemon, names, args.pool, args.parallel)
    say(f"  launched {len(names) - len(failures)}/{len(names)} in {wall:.1f} s")
    for failure in failures[:3]:
        say(f"  launch failed: {failure}")
    time.sleep(2)
    measure_api(daemon, args, out)


def main() -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)
        parser.add_argument("--instances", type=int, default=100, help="running during the run")
        parser.add_argument("--parallel", type=int, default=10, help="launches at a time")

    phase = Phase("REST latency", API_KEYS, api_phase)
    return lxd.main(__doc__ or "", [phase], arguments)


if __name__ == "__main__":
    sys.exit(main())
