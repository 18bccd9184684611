"""Shared harness for benchmarks that drive an LXD-compatible daemon over its unix socket.

A `Daemon` runs the stock `lxc` client against one socket (isolated HOME, LXD_DIR and
LXD_SOCKET set) and makes raw HTTP requests on a fresh unix connection each. `main()` gives
every benchmark script the same command line: `--socket PATH` measures one daemon and
compares it with the LXD 5.0.2 anchor figures; `--compare CROFT_SOCKET LXD_SOCKET` measures
both, phase by phase, in one run. Either way a table of figure, value, LXD, ratio, target
and verdict is printed at the end. Stdlib only.

Everything a benchmark creates is named `bench-*` (and `benchmark-*` for lxd-benchmark);
it is deleted after each phase, on failure and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from croft.common.testing.waiting import UnixHTTPConnection

PREFIX = "bench-"
IMAGE_ALIAS = "busybox"
LXD_BENCHMARK_PREFIX = "benchmark-"
T = TypeVar("T")
R = TypeVar("R")


# ---------------------------------------------------------------------------------------
# figures: declared once, with the LXD 5.0.2 anchor value and issue 3's target


@dataclass(frozen=True)
class Spec:
    """One reported figure. `ratio` is how many times better croft is than LXD:
    LXD/croft for times and memory, croft/LXD for rates."""

    name: str
    unit: str
    lower_is_better: bool = True
    anchor: float | None = None  # /work/shared/tools/lxd-anchor/README.md, busybox on dir
    limit: float | None = None  # absolute target: <= limit (or >= if higher is better)
    min_ratio: float | None = None  # target relative to LXD: ratio >= min_ratio

    def ratio(self, value: float | None, lxd: float | None) -> float | None:
        if value is None or lxd is None or value <= 0 or lxd <= 0:
            return None
        return lxd / value if self.lower_is_better else value / lxd

    def target(self) -> str:
        if self.limit is not None:
            return f"{'<=' if self.lower_is_better else '>='}{self.limit:g} {self.unit}"
        if self.min_ratio is not None:
            return f">={self.min_ratio:g}x LXD"
        return ""

    def met(self, value: float | None, lxd: float | None) -> str:
        if value is None:
            return "-"
        if self.limit is not None:
            ok = value <= self.limit if self.lower_is_better else value >= self.limit
            return "yes" if ok else "NO"
        if self.min_ratio is not None:
            ratio = self.ratio(value, lxd)
            return "-" if ratio is None else ("yes" if ratio >= self.min_ratio else "NO")
        return ""


SPECS: dict[str, Spec] = {
    "launch_p50": Spec("launch busybox (dir), p50", "ms", anchor=416, limit=150),
    "launch_p95": Spec("launch busybox (dir), p95", "ms"),
    "delete_running": Spec("delete --force (running), p50", "ms", anchor=747),
    "stop_force": Spec("stop --force, p50", "ms", anchor=736, limit=100),
    "start": Spec("start, p50", "ms", anchor=261),
    "exec_true": Spec("exec true, p50", "ms", anchor=54, limit=40),
    "api_root": Spec("in-proc GET /1.0, 100 inst, p50", "ms", anchor=0.5),
    "api_instances": Spec(
        "in-proc GET /1.0/instances?recursion=1, 100 inst, p50", "ms", anchor=38.9, limit=20
    ),
    "api_instances_p95": Spec("in-proc GET /1.0/instances?recursion=1, 100 inst, p95", "ms"),
    "curl_instances": Spec("curl GET /1.0/instances?recursion=1, 100 inst, p50", "ms", anchor=48.6),
    "lxc_list": Spec("lxc list (recursion=2), 100 inst, p50", "ms", anchor=558),
    "batch_rate": Spec(
        "100 launches, 10 in parallel: rate (median of batches)",
        "/s",
        lower_is_better=False,
        anchor=3.5,
        limit=25,
    ),
    "batch_rate_min": Spec("  slowest batch", "/s", lower_is_better=False),
    "batch_rate_max": Spec("  fastest batch", "/s", lower_is_better=False),
    "batch_wall": Spec("100 launches, 10 in parallel: wall (median)", "s", anchor=28.3),
    "batch_launch_p50": Spec("one launch under 10-way load, p50", "ms", anchor=2759),
    "batch_launch_p95": Spec("one launch under 10-way load, p95", "ms"),
    "batch_cpu_host": Spec("  host CPU per launch in the batch (all processes)", "ms"),
    "batch_cpu_daemon": Spec("  of which the daemon's processes (with reaped children)", "ms"),
    "batch_cpu_client": Spec("  of which the `lxc` client processes", "ms"),
    "batch_delete_wall": Spec("100 delete --force, 10 in parallel: wall", "s", anchor=17.7),
    "mem_host": Spec("host memory per idle container (MemAvailable)", "MiB", anchor=13.3, limit=3),
    "mem_pss": Spec("PSS per container (cgroup procs + monitor)", "MiB", limit=3),
    "mem_pss_payload": Spec("  of which container processes", "MiB"),
    "mem_pss_monitor": Spec("  of which monitor process", "MiB", anchor=11.0),
    "mem_cgroup": Spec("container cgroup memory usage", "MiB", anchor=0.43),
    "mem_daemon": Spec("daemon RSS growth per container", "MiB", anchor=0.54),
    "lxdbench_launch": Spec(
        "lxd-benchmark launch --count 100 --parallel 10", "s", anchor=16.7, min_ratio=4
    ),
    "lxdbench_delete": Spec("lxd-benchmark delete (100)", "s", anchor=40.9, min_ratio=4),
    "lxdbench_cpu_host": Spec("  host CPU per lxd-benchmark launch (all processes)", "ms"),
    "lxdbench_cpu_daemon": Spec("  of which the daemon's processes (with reaped children)", "ms"),
}


def p50(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def p95(samples: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (with 20 samples: the 19th smallest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def describe(samples: Sequence[float], scale: float = 1e3) -> str:
    s = sorted(samples)
    return (
        f"n={len(s)} min {s[0] * scale:.1f}  p50 {p50(s) * scale:.1f}  "
        f"p95 {p95(s) * scale:.1f}  max {s[-1] * scale:.1f}"
    )


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------
# the daemon under test


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclass
class Daemon:
    label: str
    socket: str
    home: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="bench-lxc-home-"))
    owns_lxd_benchmark: bool = False  # set while lxd-benchmark instances may be ours
    # more of what a benchmark created (images, remotes...): run by cleanup() after the
    # instances are gone, so after every phase, at start and on Ctrl-C
    cleanups: list[Callable[[Daemon], None]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": self.home,
            "LXD_DIR": os.path.dirname(self.socket),
            "LXD_SOCKET": self.socket,
        }

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 600) -> str:
        """Run a command against this daemon; returns stdout, raises BenchError on failure."""
        result = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise BenchError(
                f"{self.label}: `{' '.join(argv)}` exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result.stdout

    def lxc(self, *args: str, check: bool = True) -> str:
        return self.run(["lxc", *args], check=check)

    def timed_lxc(self, *args: str) -> float:
        started = time.perf_counter()
        self.lxc(*args)
        return time.perf_counter() - started

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One request on a fresh unix connection; returns the response's metadata."""
        conn = UnixHTTPConnection(self.socket)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise BenchError(f"{self.label}: {method} {path}: not JSON: {raw[:200]!r}") from e
        if response.status >= 400 or doc.get("type") == "error":
            raise BenchError(f"{self.label}: {method} {path}: {response.status} {doc.get('error')}")
        return doc.get("metadata")

    def timed_get(self, path: str) -> float:
        """Wall time of one GET on a fresh connection: connect, request, read the body."""
        started = time.perf_counter()
        conn = UnixHTTPConnection(self.socket)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise BenchError(f"{self.label}: GET {path}: HTTP {response.status}")
        return elapsed

    def environment(self) -> dict[str, Any]:
        return dict(self.request("GET", "/1.0").get("environment") or {})

    def server_pid(self) -> int | None:
        pid = self.environment().get("server_pid")
        return int(pid) if pid else None

    def instance_names(self) -> list[str]:
        return [url.rsplit("/", 1)[-1] for url in self.request("GET", "/1.0/instances")]

    def bench_names(self) -> list[str]:
        prefixes = (PREFIX, LXD_BENCHMARK_PREFIX) if self.owns_lxd_benchmark else (PREFIX,)
        return [name for name in self.instance_names() if name.startswith(prefixes)]

    def launch(self, name: str, pool: str) -> float:
        args = ["launch", IMAGE_ALIAS, name] + (["-s", pool] if pool else [])
        return self.timed_lxc(*args)

    def delete(self, names: Iterable[str], parallel: int = 10) -> None:
        """delete --force each name, `parallel` at a time; failures are reported, not raised."""

        def one(name: str) -> None:
            try:
                self.lxc("delete", "--force", name)
            except BenchError as e:
                say(f"  warning: {e}")

        run_parallel(one, list(names), parallel)

    def cleanup(self) -> None:
        """Delete every instance this harness may have created, until none is left, then
        run the benchmark's own `cleanups`."""
        self._delete_bench_instances()
        for hook in self.cleanups:
            try:
                hook(self)
            except (OSError, BenchError, subprocess.TimeoutExpired) as e:
                say(f"  warning: {self.label}: cleanup: {e}")

    def _delete_bench_instances(self) -> None:
        for _ in range(3):
            try:
                names = self.bench_names()
            except (OSError, BenchError) as e:
                say(f"  warning: {self.label}: cleanup could not list instances: {e}")
                return
            if not names:
                return
            say(f"  cleanup on {self.label}: deleting {len(names)} instances")
            self.delete(names)
            time.sleep(1)
        say(f"  warning: {self.label}: instances left behind: {self.bench_names()}")

    def image_fingerprint(self) -> str | None:
        try:
            return str(self.request("GET", f"/1.0/images/aliases/{IMAGE_ALIAS}")["target"])
        except BenchError:
            return None

    def import_image(self, tarball: str) -> str:
        say(f"  {self.label}: importing {tarball} as '{IMAGE_ALIAS}'")
        self.lxc("image", "import", tarball, "--alias", IMAGE_ALIAS)
        fingerprint = self.image_fingerprint()
        if not fingerprint:
            raise BenchError(f"{self.label}: image imported but alias '{IMAGE_ALIAS}' missing")
        return fingerprint

    def export_image(self, directory: str) -> str:
        """Export the busybox image as a unified tarball into `directory`; returns its path."""
        self.lxc("image", "export", IMAGE_ALIAS, os.path.join(directory, "busybox"))
        files = [f for f in os.listdir(directory) if f.startswith("busybox")]
        if len(files) != 1:
            raise BenchError(f"{self.label}: image export wrote {files}, expected one tarball")
        return os.path.join(directory, files[0])


def launch_many(
    daemon: Daemon, names: Sequence[str], pool: str, parallel: int
) -> tuple[float, list[float], list[str]]:
    """`lxc launch` each name, `parallel` at a time: (wall seconds, the successful
    launches' own seconds, failure messages)."""

    def one(name: str) -> float | str:
        try:
            return daemon.launch(name, pool)
        except BenchError as e:
            return str(e)

    started = time.perf_counter()
    outcomes = run_parallel(one, names, parallel)
    wall = time.perf_counter() - started
    samples = [o for o in outcomes if isinstance(o, float)]
    failures = [o for o in outcomes if isinstance(o, str)]
    if not samples:
        raise BenchError(f"all {len(names)} launches failed; first: {failures[0]}")
    return wall, samples, failures


def run_parallel(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """fn over items, `workers` at a time, results in order. On an interrupt the queued
    items are cancelled (the running ones finish) before the interrupt propagates."""
    pool = cf.ThreadPoolExecutor(max(1, workers))
    try:
        results = list(pool.map(fn, items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


# ---------------------------------------------------------------------------------------
# phases and the command line


# figure key -> value in the spec's unit, or a str: why it could not be measured
Figures = dict[str, float | str]


@dataclass(frozen=True)
class Phase:
    """A step of a benchmark. `run` stores figures into its third argument as it measures
    them, so a failure part-way keeps what was measured; the keys it did not reach are
    reported as failed with the exception's message."""

    title: str
    keys: tuple[str, ...]
    run: Callable[[Daemon, argparse.Namespace, Figures], None]


def fail(out: Figures, keys: Iterable[str], reason: str) -> None:
    """Mark the figures not yet measured as failed, and say why."""
    say(f"  FAILED: {reason}")
    for key in keys:
        out.setdefault(key, reason)


def ensure_images(daemons: list[Daemon], tarball: str | None) -> None:
    """Give every daemon the busybox image under the same alias: from --image, or else
    exported from a daemon that has it, so that both run the identical image."""
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        for daemon in daemons:
            if daemon.image_fingerprint():
                continue
            source = tarball
            if source is None:
                donor = next((d for d in daemons if d.image_fingerprint()), None)
                if donor is None:
                    raise BenchError(
                        f"{daemon.label} has no '{IMAGE_ALIAS}' image; pass --image PATH "
                        "(build one: /work/shared/tools/lxd-anchor/build-busybox-image.sh "
                        "/var/tmp/busybox.tar.gz)"
                    )
                source = donor.export_image(tmp)
            daemon.import_image(source)
    prints = {d.label: d.image_fingerprint() for d in daemons}
    shown = ", ".join(f"{label} {(fp or '?')[:12]}" for label, fp in prints.items())
    say(f"  image '{IMAGE_ALIAS}': {shown}")
    if len(set(prints.values())) > 1:
        say("  warning: the daemons' busybox images differ (different fingerprints)")


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ms" and value < 10:
        return f"{value:.2f}"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def _number(value: float | str | None) -> float | None:
    return value if isinstance(value, float | int) else None


def print_table(results: dict[str, Figures], labels: list[str], keys: list[str]) -> None:
    """One row per figure: measured value(s), LXD (live if measured, else the anchor),
    ratio (>1: croft better), target, met."""
    subject = labels[0]
    live_lxd = len(labels) > 1
    lxd_head = labels[1] if live_lxd else "LXD anchor"
    head = ["figure", "unit", subject, lxd_head, "ratio", "target", "met?"]
    rows = [head]
    for key in keys:
        spec = SPECS[key]
        raw = results[subject].get(key)
        raw_lxd = results[labels[1]].get(key) if live_lxd else spec.anchor
        value, lxd = _number(raw), _number(raw_lxd)
        ratio = spec.ratio(value, lxd)
        shown = "FAILED" if isinstance(raw, str) else fmt(value, spec.unit)
        shown_lxd = "FAILED" if isinstance(raw_lxd, str) else fmt(lxd, spec.unit)
        rows.append(
            [
                spec.name,
                spec.unit,
                shown,
                shown_lxd,
                "-" if ratio is None else f"{ratio:.1f}x",
                spec.target(),
                spec.met(value, lxd),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    say("")
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:5], widths[2:5], strict=True)]
        cells += [row[5].ljust(widths[5]), row[6]]
        say("  ".join(cells).rstrip())
        if n == 0:
            say("  ".join("-" * w for w in widths))
    for label in labels:
        reasons = dict.fromkeys(v for k, v in results[label].items() if isinstance(v, str))
        for reason in reasons:
            say(f"\nFAILED on {label}: {reason}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(
    description: str,
    phases: list[Phase],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    *,
    needs_image: bool = True,
    cleanup: Callable[[Daemon], None] | None = None,
) -> int:
    """Run `phases` on the daemon(s) of the command line and print the table. Unless
    `needs_image` is False, every daemon gets the busybox image first (`ensure_images`).
    `cleanup` joins each daemon's `cleanups` (run after each phase, at start and at exit)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--socket", help="LXD-compatible unix socket to measure")
    target.add_argument(
        "--compare",
        nargs=2,
        metavar=("CROFT_SOCKET", "LXD_SOCKET"),
        help="measure both daemons, phase by phase, and print croft beside LXD",
    )
    parser.add_argument("--image", help="busybox image tarball to import where alias is missing")
    parser.add_argument("--pool", default="default", help="storage pool ('' for the profile's)")
    parser.add_argument("--json", help="also write the figures here")
    titles = ",".join(p.title for p in phases)
    parser.add_argument("--only", help=f"comma-separated phases to run (of {titles})")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    if args.only:
        wanted = set(args.only.split(","))
        if unknown := wanted - {p.title for p in phases}:
            parser.error(f"unknown phase(s) {sorted(unknown)}; phases: {titles}")
        phases = [p for p in phases if p.title in wanted]

    if args.compare:
        daemons = [Daemon("croft", args.compare[0]), Daemon("LXD", args.compare[1])]
    else:
        sock = args.socket or "/var/lib/lxd/unix.socket"
        # /var/lib/lxd/unix.socket -> "lxd", /var/lib/croft/unix.socket -> "croft"
        daemons = [Daemon(os.path.basename(os.path.dirname(sock)) or sock, sock)]
    if cleanup is not None:
        for d in daemons:
            d.cleanups.append(cleanup)
    for tool in ("lxc", "curl"):
        if not shutil.which(tool):
            parser.error(f"`{tool}` is not on PATH (apt-get install lxd-client curl)")

    signal.signal(signal.SIGTERM, _interrupt)
    results: dict[str, Figures] = {d.label: {} for d in daemons}
    interrupted = False
    try:
        for d in daemons:
            try:
                env = d.environment()
            except OSError as e:
                raise BenchError(f"{d.label}: no daemon answers on {d.socket}: {e}") from e
            say(
                f"# {d.label}: {d.socket}: {env.get('server')} {env.get('server_version')}, "
                f"driver {env.get('driver')} {env.get('driver_version')}, "
                f"{len(d.instance_names())} instances"
            )
            d.lxc("list", "--format", "csv")  # first run of the client writes its config
            d.cleanup()  # leftovers of an interrupted earlier run
        if needs_image:
            ensure_images(daemons, args.image)
        for phase in phases:
            for d in daemons:
                say(f"\n## {phase.title} on {d.label}")
                try:
                    phase.run(d, args, results[d.label])
                except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                    fail(results[d.label], phase.keys, f"{phase.title}: {e}")
                finally:
                    d.cleanup()
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: cleaning up")
    except (BenchError, OSError) as e:
        say(f"\nerror: {e}")
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for d in daemons:
            d.cleanup()
            shutil.rmtree(d.home, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    keys = [k for phase in phases for k in phase.keys]
    print_table(results, [d.label for d in daemons], keys)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit("this is the shared harness; run bench/launch.py or bench/api.py")
