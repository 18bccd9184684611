#!/usr/bin/env python3
"""p50/p99 of a gRPC round trip to a croft service found through discovery, and of a
store compare-and-swap write, on an isolated croft started for the run.

    .venv/bin/python bench/rpc.py [--calls 2000] [--writes 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from croft.common import internal_tls, rpc
from croft.common.store import connect, dump
from croft.v1 import common_pb2, common_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:7.3f} ms   p99 {p99 * 1000:7.3f} ms   (n={len(ordered)})"


async def measure(endpoint: str, state: Path, calls: int, writes: int) -> None:
    # As croft's services do: mutual TLS with the member's internal certificate.
    store = await connect([endpoint], internal_tls.load(state))
    client = await rpc.ServiceClient(store, "images", common_pb2_grpc.ServiceStub).start()
    request = common_pb2.StatusRequest()
    for _ in range(200):  # warm the channel
        await client.call("Status", request)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.call("Status", request)
        samples.append(time.perf_counter() - started)
    print(f"gRPC round trip via discovery (images.Status): {percentiles(samples)}")

    key = "/croft/bench/counter"
    entry = await store.put(key, dump({"n": 0}))
    samples = []
    for n in range(writes):
        started = time.perf_counter()
        entry = await store.update(key, dump({"n": n + 1}), revision=entry.revision)
        samples.append(time.perf_counter() - started)
    print(f"store compare-and-swap write (etcd):           {percentiles(samples)}")
    await store.delete(key)
    await client.close()
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="croft-bench-") as tmp:
        root = Path(tmp)
        endpoint = f"https://127.0.0.1:{free_port()}"
        config = root / "croft.yaml"
        config.write_text(
            f"member: bench\nstate_dir: {root}/state\nlog_dir: {root}/log\n"
            f"run_dir: {root}/run\netcd:\n  endpoints: [{endpoint}]\n"
            f"  peer_port: {free_port()}\n"
        )
        env = {**os.environ, "CROFT_CONFIG": str(config)}
        croft = [sys.executable, "-m", "croft.client.cli"]
        subprocess.run([*croft, "up"], env=env, check=True, capture_output=True)
        try:
            asyncio.run(measure(endpoint, root / "state", args.calls, args.writes))
        finally:
            subprocess.run([*croft, "down"], env=env, check=False, capture_output=True)


if __name__ == "__main__":
    main()
