#!/usr/bin/env python3
"""Issue 3's container figures for an LXD-compatible daemon, with the stock `lxc` client:

  lifecycle      launch busybox (p50, p95), delete --force, stop --force, start, exec true
                 (whole-command wall time, one at a time)
  density        100 launches 10 at a time, in --batches batches (rate and CPU per launch:
                 medians of the batches; per-launch p50/p95 under load), host
                 memory per idle container (MemAvailable drop, PSS of each container's
                 processes and its monitor), the REST figures of bench/api.py with those
                 100 running, then deleting them 10 at a time
  lxd-benchmark  `lxd-benchmark launch --count 100 --parallel 10 FINGERPRINT`, then
                 `lxd-benchmark delete` (Debian's lxd-tools)

    python3 bench/launch.py --socket /var/lib/lxd/unix.socket
    python3 bench/launch.py --compare /var/lib/croft/unix.socket /var/lib/lxd/unix.socket

With --compare each phase runs on croft and then on LXD before the next phase starts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import sys
import time

import api
import lxd
from lxd import BenchError, Daemon, Figures, Phase, describe, p50, p95, say

# ---------------------------------------------------------------------------------------
# lifecycle


def lifecycle(daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    warm = lxd.PREFIX + "warm"
    daemon.launch(warm, args.pool)  # first launch unpacks/caches the image
    daemon.lxc("delete", "--force", warm)

    names = [f"{lxd.PREFIX}l{i:02d}" for i in range(args.runs)]
    launch = [daemon.launch(name, args.pool) for name in names]
    say(f"  launch                {describe(launch)} ms")
    out["launch_p50"], out["launch_p95"] = p50(launch) * 1e3, p95(launch) * 1e3
    delete = [daemon.timed_lxc("delete", "--force", name) for name in names]
    say(f"  delete --force        {describe(delete)} ms")
    out["delete_running"] = p50(delete) * 1e3

    one = lxd.PREFIX + "a"
    daemon.launch(one, args.pool)
    stop, start = [], []
    for _ in range(args.stop_runs):
        stop.append(daemon.timed_lxc("stop", "--force", one))
        start.append(daemon.timed_lxc("start", one))
    say(f"  stop --force          {describe(stop)} ms")
    say(f"  start                 {describe(start)} ms")
    out["stop_force"], out["start"] = p50(stop) * 1e3, p50(start) * 1e3
    time.sleep(0.5)
    execs = [daemon.timed_lxc("exec", one, "--", "true") for _ in range(args.runs)]
    say(f"  exec true             {describe(execs)} ms")
    out["exec_true"] = p50(execs) * 1e3
    daemon.lxc("delete", "--force", one)


# ---------------------------------------------------------------------------------------
# memory: host-wide and per container


def mem_available_mib(samples: int = 5, interval: float = 0.4) -> float:
    """Median MemAvailable over a couple of seconds (other work on the host moves it)."""
    values = []
    for n in range(samples):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    values.append(int(line.split()[1]) / 1024)
        if n + 1 < samples:
            time.sleep(interval)
    return statistics.median(values)


def pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass  # the process exited meanwhile
    return 0.0


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        # the command name (field 2) may contain spaces; fields after its ')' are plain
        return int(f.read().rsplit(")", 1)[1].split()[1])


def host_cpu_ms() -> float:
    """Busy CPU time of the whole host so far (every CPU, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) * 1000 / os.sysconf("SC_CLK_TCK")


def deletion_window() -> float:
    """Seconds for which ext4 without a journal treats a freed inode as recently deleted:
    vm.dirty_expire_centisecs (30 s by default), or six times that while the inode table
    block is still dirty (`recently_deleted()` in fs/ext4/ialloc.c)."""
    try:
        with open("/proc/sys/vm/dirty_expire_centisecs") as f:
            return int(f.read()) / 100
    except (OSError, ValueError):
        return 30.0


def settle(
    busy_limit: float = 0.05,
    window: float = 2.0,
    timeout: float = 120.0,
    after_deletions: float = 0.0,
) -> None:
    """Wait until the host's CPUs are idle but for `busy_limit` of their time over a
    `window`: work a previous phase left running (the other daemon's cleanup of its
    containers, the kernel freeing their cgroups) would otherwise be billed to the next
    timed phase, whichever daemon it runs on.

    `after_deletions` > 0: first write back dirty data (`sync`) and rest that many seconds.
    On ext4 without a journal (this host's root), every inode allocated in a group where
    inodes were freed within `deletion_window()` costs a scan past them: a batch of
    launches right after the previous phase deleted 100 containers, on either daemon,
    paid up to 50 ms of kernel time per rootfs for those deletions."""
    if after_deletions > 0:
        os.sync()
        say(f"  (sync, then {after_deletions:.0f} s for the last phase's deletions to age)")
        time.sleep(after_deletions)
    cpus = os.cpu_count() or 1
    deadline = time.monotonic() + timeout
    while True:
        busy0, started = host_cpu_ms(), time.monotonic()
        time.sleep(window)
        busy = (host_cpu_ms() - busy0) / ((time.monotonic() - started) * 1000 * cpus)
        if busy <= busy_limit:
            return
        if time.monotonic() > deadline:
            say(f"  warning: the host stays {busy:.0%} busy; timing anyway")
            return


def children_cpu_ms() -> float:
    """CPU time of this process's children so far (the `lxc` and lxd-benchmark runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def daemon_pids(server_pid: int) -> list[int]:
    """The daemon's processes: croft's node agent and every service and etcd under it
    (the api's parent), or LXD's one process."""
    parent = parent_pid(server_pid)
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            supervised = b"croft.node" in f.read()
    except OSError:
        supervised = False
    if not supervised:
        return [server_pid]
    pids = [parent]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if parent_pid(int(entry)) == parent:
                    pids.append(int(entry))
    return pids


def process_cpu_ms(pids: list[int]) -> float:
    """CPU time of `pids`, with that of the children they reaped (lxc-start, lxc-attach)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total * 1000 / os.sysconf("SC_CLK_TCK")


def memory_cgroup(pid: int) -> str | None:
    """The memory cgroup directory of a process (cgroup v1 memory controller, else v2)."""
    unified = None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return "/sys/fs/cgroup/memory" + path
            if controllers == "":
                unified = path
    if unified is None:
        return None
    hybrid = "/sys/fs/cgroup/unified"
    return (hybrid if os.path.isdir(hybrid) else "/sys/fs/cgroup") + unified


def cgroup_pids(directory: str) -> set[int]:
    pids: set[int] = set()
    for root, _, files in os.walk(directory):
        if "cgroup.procs" in files:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
    return pids


def cgroup_usage_mib(directory: str) -> float | None:
    for name in ("memory.usage_in_bytes", "memory.current"):
        try:
            with open(os.path.join(directory, name)) as f:
                return int(f.read()) / 1048576
        except OSError:
            continue
    return None


def container_memory(daemon: Daemon, names: list[str], server_pid: int | None) -> dict[str, float]:
    """Mean per running container: PSS of its cgroup's processes, PSS of its monitor (the
    parent of its init: liblxc's `[lxc monitor]`/lxc-start process), cgroup usage."""
    payload, monitor, usage, counted = 0.0, 0.0, [], 0
    monitor_names: set[str] = set()
    for name in names:
        state = daemon.request("GET", f"/1.0/instances/{name}/state")
        init = int(state.get("pid") or 0)
        if state.get("status") != "Running" or init <= 0:
            continue
        directory = memory_cgroup(init)
        pids = cgroup_pids(directory) if directory else {init}
        payload += sum(pss_mib(p) for p in pids)
        parent = parent_pid(init)
        if parent > 1 and parent not in pids and parent != server_pid:
            monitor += pss_mib(parent)
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                words = f.read().replace(b"\0", b" ").decode(errors="replace").split()
                monitor_names.add(" ".join(words[:2]))
        if directory and (used := cgroup_usage_mib(directory)) is not None:
            usage.append(used)
        counted += 1
    if not counted:
        raise BenchError(f"{daemon.label}: no running container reported an init pid")
    say(f"  monitor processes: {sorted(monitor_names)}; {counted} containers inspected")
    figures = {
        "mem_pss": (payload + monitor) / counted,
        "mem_pss_payload": payload / counted,
        "mem_pss_monitor": monitor / counted,
    }
    if usage:
        figures["mem_cgroup"] = statistics.mean(usage)
    return figures


# ---------------------------------------------------------------------------------------
# density


MEMORY_KEYS = ("mem_host", "mem_pss", "mem_pss_payload", "mem_pss_monitor", "mem_cgroup")


def batch(
    daemon: Daemon, args: argparse.Namespace, names: list[str], pids: list[int]
) -> tuple[float, list[float], list[str], dict[str, float | None]]:
    """One batch of launches after a settle: (wall seconds, each launch's seconds,
    failures, CPU per launch: host, daemon, `lxc` clients)."""
    settle(after_deletions=args.deletion_rest)
    host0, daemon0, client0 = host_cpu_ms(), process_cpu_ms(pids), children_cpu_ms()
    wall, samples, failures = lxd.launch_many(daemon, names, args.pool, args.parallel)
    per = max(1, len(samples))
    cpu = {
        "host": (host_cpu_ms() - host0) / per,
        "daemon": (process_cpu_ms(pids) - daemon0) / per if pids else None,
        "client": (children_cpu_ms() - client0) / per,
    }
    return wall, samples, failures, cpu


def density(daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    server_pid = daemon.server_pid()
    daemon_rss0 = rss_mib(server_pid) if server_pid else None
    avail0 = mem_available_mib()
    names = [f"{lxd.PREFIX}d{i:03d}" for i in range(args.count)]
    pids = daemon_pids(server_pid) if server_pid else []
    # The host's speed drifts from minute to minute (bench/README.md): the rate and the
    # CPU figures are the medians of `--batches` batches; the last one's containers stay
    # for the memory and REST figures.
    rates, walls, under_load = [], [], []
    cpus: dict[str, list[float]] = {"host": [], "daemon": [], "client": []}
    for number in range(1, args.batches + 1):
        wall, samples, failures, cpu = batch(daemon, args, names, pids)
        launched = len(samples)
        rates.append(launched / wall)
        walls.append(wall)
        under_load += samples
        for key, value in cpu.items():
            if value is not None:
                cpus[key].append(value)
        say(
            f"  batch {number}/{args.batches}: {launched}/{args.count} launched in {wall:.1f} s "
            f"({launched / wall:.2f}/s); CPU per launch: host {cpu['host']:.0f} ms, daemon "
            f"{lxd.fmt(cpu['daemon'])} ms ({len(pids)} processes), lxc client "
            f"{cpu['client']:.0f} ms"
        )
        for failure in failures[:3]:
            say(f"  launch failed: {failure}")
        if number < args.batches:
            daemon.delete(names, args.parallel)
    # On 2 cores the rate cannot beat 2 s / (CPU per launch).
    out["batch_cpu_host"] = p50(cpus["host"])
    out["batch_cpu_daemon"] = p50(cpus["daemon"]) if cpus["daemon"] else None
    out["batch_cpu_client"] = p50(cpus["client"])
    out["batch_rate"], out["batch_wall"] = p50(rates), p50(walls)
    out["batch_rate_min"], out["batch_rate_max"] = min(rates), max(rates)
    say(
        f"  rate: median {out['batch_rate']:.2f}/s of {len(rates)} batches "
        f"({', '.join(f'{r:.2f}' for r in rates)})"
    )
    say(f"  one launch under load {describe(under_load)} ms")
    out["batch_launch_p50"], out["batch_launch_p95"] = p50(under_load) * 1e3, p95(under_load) * 1e3

    time.sleep(args.settle)
    running = [
        i["name"]
        for i in daemon.request("GET", "/1.0/instances?recursion=1")
        if i["name"] in names and i["status"] == "Running"
    ]
    avail1 = mem_available_mib()
    out["mem_host"] = (avail0 - avail1) / max(1, len(running))
    say(
        f"  MemAvailable {avail0:.0f} -> {avail1:.0f} MiB with {len(running)} running: "
        f"{out['mem_host']:.2f} MiB each"
    )
    if server_pid and daemon_rss0:
        daemon_rss1 = rss_mib(server_pid)
        out["mem_daemon"] = (daemon_rss1 - daemon_rss0) / max(1, len(running))
        say(f"  daemon (pid {server_pid}) RSS {daemon_rss0:.1f} -> {daemon_rss1:.1f} MiB")
    else:
        out["mem_daemon"] = "GET /1.0 reports no environment.server_pid"
    # The later steps do not depend on this one: a failure here must not cost their figures.
    try:
        memory = container_memory(daemon, running, server_pid)
        out.update(memory)
        say(
            f"  PSS per container {memory['mem_pss']:.2f} MiB (processes "
            f"{memory['mem_pss_payload']:.2f} + monitor {memory['mem_pss_monitor']:.2f}), "
            f"cgroup usage {lxd.fmt(memory.get('mem_cgroup'))} MiB"
        )
    except (BenchError, OSError) as e:
        lxd.fail(out, MEMORY_KEYS, f"per-container memory: {e}")
    try:
        api.measure_api(daemon, args, out)
    except (BenchError, OSError) as e:
        lxd.fail(out, api.API_KEYS, f"REST latency: {e}")

    started = time.perf_counter()
    daemon.delete(names, args.parallel)
    out["batch_delete_wall"] = time.perf_counter() - started
    say(f"  deleted {len(names)} in {out['batch_delete_wall']:.1f} s")


# ---------------------------------------------------------------------------------------
# lxd-benchmark


def lxd_benchmark(daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    if not shutil.which("lxd-benchmark"):
        raise BenchError("lxd-benchmark is not installed (apt-get install lxd-tools)")
    # `lxd-benchmark delete` deletes every benchmark-* instance: refuse to run over someone's.
    theirs = [n for n in daemon.instance_names() if n.startswith(lxd.LXD_BENCHMARK_PREFIX)]
    if theirs:
        raise BenchError(f"{daemon.label} already has {len(theirs)} benchmark-* instances")
    fingerprint = daemon.image_fingerprint()
    if not fingerprint:
        raise BenchError(f"{daemon.label}: no '{lxd.IMAGE_ALIAS}' image")
    daemon.owns_lxd_benchmark = True
    try:
        count, parallel = str(args.lxd_benchmark_count), str(args.parallel)
        server_pid = daemon.server_pid()
        pids = daemon_pids(server_pid) if server_pid else []
        settle(after_deletions=args.deletion_rest)
        host0, daemon0 = host_cpu_ms(), process_cpu_ms(pids)
        started = time.perf_counter()
        daemon.run(
            ["lxd-benchmark", "launch", "--count", count, "--parallel", parallel, fingerprint]
        )
        launch = time.perf_counter() - started
        per = max(1, args.lxd_benchmark_count)
        out["lxdbench_cpu_host"] = (host_cpu_ms() - host0) / per
        out["lxdbench_cpu_daemon"] = (process_cpu_ms(pids) - daemon0) / per if pids else None
        say(
            f"  CPU per launch: host {out['lxdbench_cpu_host']:.0f} ms, daemon "
            f"{lxd.fmt(out['lxdbench_cpu_daemon'])} ms"
        )
        made = [
            i
            for i in daemon.request("GET", "/1.0/instances?recursion=1")
            if i["name"].startswith(lxd.LXD_BENCHMARK_PREFIX)
        ]
        running = sum(1 for i in made if i["status"] == "Running")
        say(f"  lxd-benchmark launch: {launch:.1f} s, {len(made)} created, {running} running")
        if running != args.lxd_benchmark_count:
            raise BenchError(f"lxd-benchmark launch left {running} running, not {count}")
        out["lxdbench_launch"] = launch
        started = time.perf_counter()
        daemon.run(["lxd-benchmark", "delete"])
        delete = time.perf_counter() - started
        left = [n for n in daemon.instance_names() if n.startswith(lxd.LXD_BENCHMARK_PREFIX)]
        say(f"  lxd-benchmark delete: {delete:.1f} s, {len(left)} left")
        if left:
            raise BenchError(f"lxd-benchmark delete left {len(left)} instances")
        out["lxdbench_delete"] = delete
    finally:
        daemon.cleanup()
        daemon.owns_lxd_benchmark = False


# ---------------------------------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    api.add_arguments(parser)
    parser.add_argument("--runs", type=int, default=20, help="launches / execs, one at a time")
    parser.add_argument("--stop-runs", type=int, default=10, help="stop --force + start cycles")
    parser.add_argument("--count", type=int, default=100, help="instances in the density run")
    parser.add_argument("--parallel", type=int, default=10, help="launches at a time")
    parser.add_argument(
        "--batches",
        type=int,
        default=3,
        help="density batches (each after a sync and rest); rate and CPU are their medians",
    )
    parser.add_argument("--settle", type=float, default=10, help="idle seconds before memory")
    parser.add_argument(
        "--deletion-rest",
        type=float,
        default=deletion_window() + 1,
        help="seconds to rest (after a sync) before each batch of launches, so that the "
        "previous phase's deletions no longer slow inode allocation (0: no rest)",
    )
    parser.add_argument("--lxd-benchmark-count", type=int, default=100)


PHASES = [
    Phase(
        "lifecycle",
        ("launch_p50", "launch_p95", "delete_running", "stop_force", "start", "exec_true"),
        lifecycle,
    ),
    Phase(
        "density",
        (
            "batch_rate",
            "batch_rate_min",
            "batch_rate_max",
            "batch_cpu_host",
            "batch_cpu_daemon",
            "batch_cpu_client",
            "batch_wall",
            "batch_launch_p50",
            "batch_launch_p95",
            "batch_delete_wall",
            *MEMORY_KEYS,
            "mem_daemon",
            *api.API_KEYS,
        ),
        density,
    ),
    Phase(
        "lxd-benchmark",
        ("lxdbench_launch", "lxdbench_cpu_host", "lxdbench_cpu_daemon", "lxdbench_delete"),
        lxd_benchmark,
    ),
]


def main() -> int:
    return lxd.main(__doc__ or "", PHASES, arguments)


if __name__ == "__main__":
    sys.exit(main())
