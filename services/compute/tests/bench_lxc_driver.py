# ruff: noqa: ASYNC221, ASYNC240
# (tests inspect the host directly: blocking reads there are the point)
"""Benchmark of the LXC driver (not a test: run it by hand, as root).

    .venv/bin/python services/compute/tests/bench_lxc_driver.py [--count 20]

Measures create, start, exec `true` (end to end: spawn, wait, exit code), stop --force,
clean stop, and host memory per idle busybox container (PSS of its lxc monitor + its
processes, and the change in host "used" memory)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TEST_ROOT, build_busybox_rootfs  # noqa: E402

from croft.compute.drivers import InstanceSpec  # noqa: E402
from croft.compute.drivers.lxc import LXCDriver  # noqa: E402


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def used_kib() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0])
    return (
        info["MemTotal"] - info["MemFree"] - info["Buffers"] - info["Cached"] - info["SReclaimable"]
    )


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f}


def show(label: str, samples: list[float]) -> None:
    samples = sorted(samples)
    print(f"{label:28s} min {samples[0]:7.1f}  median {statistics.median(samples):7.1f}  "
          f"max {samples[-1]:7.1f} ms  (n={len(samples)})")  # fmt: skip


async def main(count: int) -> None:
    work = TEST_ROOT / f"bench-{os.getpid()}"
    template = work / "template"
    build_busybox_rootfs(template)
    driver = LXCDriver(str(work / "lxc"))
    names = [f"crtst-lxc-bench{i}" for i in range(count)]
    create, start, execs, stop_force, stop_clean = [], [], [], [], []
    try:
        for name in names:
            rootfs = work / "rootfs" / name
            rootfs.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(template), str(rootfs)], check=True)
        subprocess.run(["sync"])
        used_before = used_kib()
        info_before = meminfo()
        for name in names:
            t = time.perf_counter()
            await driver.create(InstanceSpec(name=name, rootfs=str(work / "rootfs" / name)))
            create.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await driver.start(name)
            start.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(2)
        used_after = used_kib()
        info_after = meminfo()
        monitors, inside = [], []
        for name in names:
            pid = (await driver.state(name)).pid
            with open(f"/proc/{pid}/status") as f:
                ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
            monitors.append(pss_kib(ppid))
            tasks = Path(f"/sys/fs/cgroup/pids/lxc.payload.{name}/cgroup.procs").read_text().split()
            inside.append(sum(pss_kib(int(p)) for p in tasks))
        for _ in range(5):
            for name in names[:5]:
                t = time.perf_counter()
                process = await driver.exec(name, ["true"])
                code = await process.wait()
                process.close()
                execs.append((time.perf_counter() - t) * 1000)
                assert code == 0
        for name in names:
            t = time.perf_counter()
            await driver.stop(name, force=True)
            stop_force.append((time.perf_counter() - t) * 1000)
        for name in names[:5]:
            await driver.start(name)
            await asyncio.sleep(0.2)
            t = time.perf_counter()
            await driver.stop(name, timeout=10)
            stop_clean.append((time.perf_counter() - t) * 1000)
        show("create (config write)", create)
        show("start (lxc-start)", start)
        show("exec true (end to end)", execs)
        show("stop --force", stop_force)
        show("stop (clean, SIGPWR)", stop_clean)
        print(f"monitor PSS per container: median {statistics.median(monitors) / 1024:.2f} MiB")
        print(f"container processes PSS:   median {statistics.median(inside) / 1024:.2f} MiB")
        print(f"host 'used' per container: {(used_after - used_before) / count / 1024:.2f} MiB "
              f"({count} containers)")  # fmt: skip
        fields = ("AnonPages", "Shmem", "Slab", "SUnreclaim", "Percpu", "KernelStack", "PageTables")
        print("  of which, per container (MiB): " + ", ".join(
            f"{k} {(info_after[k] - info_before[k]) / count / 1024:.2f}" for k in fields
        ))  # fmt: skip
    finally:
        for name in await driver.list():
            if (await driver.state(name)).status.label != "Stopped":
                await driver.stop(name, force=True)
            await driver.delete(name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20)
    asyncio.run(main(parser.parse_args().count))
