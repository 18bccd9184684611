"""Issue 19's cluster figures on a 3-member rig (croft.common.testing.cluster) formed for the
run: `lxc list` of N instances (default 300, spread by placement) through each member, and
the extra latency of a forwarded instance operation (`GET /1.0/instances/NAME/state` of a
container on m2 asked of m2 itself, then of m1, which calls m2's compute).

    .venv/bin/python bench/cluster.py [--count 300] [--runs 20] [--keep DIR]

Run as root (network namespaces). Prints a table; targets: `lxc list` under 100 ms
through any member, forwarding under 5 ms.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import ssl
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from croft.common.testing.cluster import ClusterRig
from croft.imageformat.builder import build_image

REPO = Path(__file__).resolve().parent.parent


def _client_context(rig: ClusterRig) -> ssl.SSLContext:
    assert rig.lxc_home is not None
    config = rig.lxc_home / ".config" / "lxc"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(config / "client.crt", config / "client.key")
    return context


def _get_ms(context: ssl.SSLContext, url: str, runs: int) -> float:
    """Median wall time of `runs` GETs of `url` (a new TLS connection each, as lxc makes)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with urllib.request.urlopen(url, context=context, timeout=60) as reply:
            reply.read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _lxc_list_ms(rig: ClusterRig, member: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        rig.lxc(member, "list", "--format", "csv", "-c", "nsL")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--keep", default="", help="keep the rig in DIR (CROFT_TEST_KEEP)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="croft-bench-cluster-", dir="/tmp"))
    if args.keep:
        os.environ["CROFT_TEST_KEEP"] = "1"
    rig = ClusterRig(root, size=3)
    rig.start()
    try:
        print(f"rig formed in {rig.startup_seconds:.0f} s")
        image = root / "busybox.tar.gz"
        build_image(REPO / "services/images/definitions/busybox.yaml", image)
        rig.lxc(0, "image", "import", str(image), "m1:", "--alias", "busybox")
        rig.lxc(0, "profile", "device", "remove", "m1:default", "eth0", check=False)
        started = time.monotonic()

        def create(i: int) -> None:
            rig.lxc(i % 3, "init", f"{rig.members[i % 3].name}:busybox",
                    f"{rig.members[i % 3].name}:b{i}")  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(create, range(args.count)))
        print(f"{args.count} instances created in {time.monotonic() - started:.0f} s")
        spread: dict[str, int] = {}
        for row in rig.lxc_json(0, "list"):
            spread[row["location"]] = spread.get(row["location"], 0) + 1
        print("spread:", json.dumps(spread))
        rig.lxc(1, "start", "m2:b1")  # held by m2 (untargeted placement, or forwarded)
        holder = next(r["location"] for r in rig.lxc_json(0, "list") if r["name"] == "b1")
        context = _client_context(rig)
        rows = []
        for index, member in enumerate(rig.members):
            base = f"https://{member.https}"
            lxc_ms = _lxc_list_ms(rig, index, max(3, args.runs // 4))
            raw = _get_ms(context, f"{base}/1.0/instances?recursion=2", max(3, args.runs // 4))
            rows.append((f"lxc list ({args.count}) via {member.name}", lxc_ms, 100.0))
            rows.append((f"GET /1.0/instances?recursion=2 via {member.name}", raw, 100.0))
        by_name = {m.name: m for m in rig.members}
        local = _get_ms(context, f"https://{by_name[holder].https}/1.0/instances/b1/state",
                        args.runs)  # fmt: skip
        other = next(m for m in rig.members if m.name != holder)
        remote = _get_ms(context, f"https://{other.https}/1.0/instances/b1/state", args.runs)
        rows.append((f"GET .../b1/state on its member ({holder})", local, 0.0))
        rows.append((f"GET .../b1/state via {other.name} (forwarded)", remote, 0.0))
        rows.append(("forwarding's extra latency", remote - local, 5.0))
        print(f"\n{'figure':<48} {'median ms':>10} {'target':>8}")
        for name, value, target in rows:
            print(f"{name:<48} {value:>10.1f} {(f'<{target:g}' if target else ''):>8}")
    finally:
        if not args.keep:
            rig.stop()


if __name__ == "__main__":
    main()
