#!/usr/bin/env python3
"""Issue 16's storage figures for an LXD-compatible daemon, with the stock `lxc` client,
every instance on a btrfs pool made for the run (`lxc storage create bench-bt btrfs
size=--pool-size`, the same size on both daemons):

  busybox   launch busybox (p50 of --runs, after a warm-up launch)
  debian    launch the Debian 12 image until `GET /1.0/instances/NAME/state` shows an
            IPv4 address on eth0 (p50 of --runs)
  copy      `lxc copy` of a stopped Debian container (p50 of --runs)
  backup    `lxc export` of a stopped Debian container, `lxc delete`, `lxc import` (p50 of
            --runs each). A daemon whose `lxc export` fails is skipped with "not supported
            by this daemon"
  density   on the fresh pool (the pool and the image are deleted after every phase),
            --count Debian containers created (`lxc init`), --parallel at a time; the pool's
            used space (GET /1.0/storage-pools/bench-bt/resources, after a sync) before, after
            the first (which unpacks the image onto the pool) and after all, beside the
            first's and the image rootfs's unpacked size (the sum of its files' sizes)

    .venv/bin/python bench/storage.py --compare CROFT_SOCKET /var/lib/lxd/unix.socket
    .venv/bin/python bench/storage.py --compare isolated /var/lib/lxd/unix.socket

`isolated` starts a croft of its own under a temporary directory (its own etcd, bridge and
nftables table, as tests/conftest.py's `croft_lxc`) and takes it down at the end. Both
daemons get the identical Debian image file (alias bench-debian, a fingerprint of its own:
bench/images.py's unique_copy); it, the pool and every bench-* instance are deleted after
each phase and at the end. Run with croft's venv (for the isolated croft and images.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lxd
from images import IMAGES_DIR, delete_images, sha256_file, unique_copy
from lxd import SPECS, BenchError, Daemon, Figures, Phase, Spec, describe, p50, say

POOL = "bench-bt"
DEBIAN_ALIAS = "bench-debian"
NONCE = 0x62656E10  # bench/images.py's unique_copy: this benchmark's own Debian fingerprint
UNSUPPORTED = "not supported by this daemon"

SPECS.update(
    {
        "st_busybox": Spec("launch busybox (btrfs), p50", "ms", anchor=302, min_ratio=2),
        "st_debian_ipv4": Spec(
            "launch Debian until it has an IPv4 address (btrfs), p50", "ms", anchor=1591, limit=800
        ),
        "st_debian_ipv4_vs_lxd": Spec("  same, against LXD's", "ms", anchor=1591, min_ratio=2),
        "st_copy": Spec("lxc copy of a stopped Debian container, p50", "ms", min_ratio=5),
        "st_export": Spec("lxc export of a stopped Debian container, p50", "ms", min_ratio=2),
        "st_import": Spec("lxc import of that backup, p50", "ms", min_ratio=2),
        "st_export_size": Spec("  size of the backup tarball", "MiB"),
        "st_image_size": Spec("Debian image: its rootfs unpacked (sum of file sizes)", "MiB"),
        "st_disk_first": Spec("pool space used by the first Debian container", "MiB"),
        "st_disk_each": Spec("pool space used by each further Debian container", "MiB"),
        "st_disk_all": Spec("pool space used by --count Debian containers", "MiB"),
        "st_disk_ratio": Spec(
            "  that, in % of the first one's (the image on the pool)", "%", limit=110
        ),
        "st_disk_rootfs": Spec("  that, in % of the unpacked rootfs (sum of file sizes)", "%"),
    }
)
BUSYBOX_KEYS = ("st_busybox",)
DEBIAN_KEYS = ("st_debian_ipv4", "st_debian_ipv4_vs_lxd")
COPY_KEYS = ("st_copy",)
BACKUP_KEYS = ("st_export", "st_import", "st_export_size")
DENSITY_KEYS = (
    "st_image_size",
    "st_disk_first",
    "st_disk_each",
    "st_disk_all",
    "st_disk_ratio",
    "st_disk_rootfs",
)


# ---------------------------------------------------------------------------------------
# the pool and the Debian image


def pool_names(daemon: Daemon) -> list[str]:
    return [url.rsplit("/", 1)[-1] for url in daemon.request("GET", "/1.0/storage-pools")]


def ensure_pool(daemon: Daemon, args: argparse.Namespace) -> None:
    if POOL not in pool_names(daemon):
        daemon.lxc("storage", "create", POOL, "btrfs", f"size={args.pool_size}")


@dataclass
class Setup:
    """What every phase shares: the run's directory and its copy of the Debian image."""

    work: Path
    debian: Path | None = None
    fingerprint: str = ""
    image_mib: float = 0.0


def ensure_debian(setup: Setup, daemon: Daemon) -> None:
    if setup.debian is None:
        raise BenchError("no Debian image (--debian-image; `make images` builds it)")
    try:
        daemon.request("GET", f"/1.0/images/{setup.fingerprint}")
    except BenchError:
        daemon.lxc("image", "import", str(setup.debian), "--alias", DEBIAN_ALIAS)


def cleanup(setup: Setup, daemon: Daemon) -> None:
    """After the bench-* instances: the Debian image, then the pool (with the busybox
    image's volume on it)."""
    if setup.fingerprint:
        delete_images(daemon, {setup.fingerprint})
    if POOL in pool_names(daemon):
        daemon.lxc("storage", "delete", POOL)


def prepare(setup: Setup, daemon: Daemon, args: argparse.Namespace) -> None:
    ensure_pool(daemon, args)
    ensure_debian(setup, daemon)


# ---------------------------------------------------------------------------------------
# phases


def busybox(setup: Setup, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    ensure_pool(daemon, args)
    warm = lxd.PREFIX + "warm"
    daemon.launch(warm, POOL)  # the first launch unpacks the image onto the pool
    daemon.lxc("delete", "--force", warm)
    names = [f"{lxd.PREFIX}b{i:02d}" for i in range(args.runs)]
    samples = [daemon.launch(name, POOL) for name in names]
    say(f"  launch busybox        {describe(samples)} ms")
    out["st_busybox"] = p50(samples) * 1e3
    daemon.delete(names)


def ipv4(daemon: Daemon, name: str) -> str | None:
    state = daemon.request("GET", f"/1.0/instances/{name}/state")
    for device, network in (state.get("network") or {}).items():
        if device == "lo":
            continue
        for address in network.get("addresses") or []:
            if address.get("family") == "inet" and address.get("scope") == "global":
                return str(address["address"])
    return None


def launch_until_ipv4(daemon: Daemon, name: str, timeout: float = 120) -> float:
    started = time.perf_counter()
    daemon.lxc("launch", DEBIAN_ALIAS, name, "-s", POOL)
    while ipv4(daemon, name) is None:
        if time.perf_counter() - started > timeout:
            raise BenchError(f"{daemon.label}: {name} has no IPv4 address after {timeout:.0f} s")
        time.sleep(0.02)
    return time.perf_counter() - started


def debian(setup: Setup, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    prepare(setup, daemon, args)
    warm = lxd.PREFIX + "dwarm"
    launch_until_ipv4(daemon, warm)  # unpacks the image onto the pool
    daemon.lxc("delete", "--force", warm)
    samples = []
    for n in range(args.runs):
        name = f"{lxd.PREFIX}d{n:02d}"
        samples.append(launch_until_ipv4(daemon, name))
        # one at a time: a running Debian's boot would slow the next launch
        daemon.lxc("delete", "--force", name)
    say(f"  launch -> IPv4        {describe(samples)} ms")
    out["st_debian_ipv4"] = out["st_debian_ipv4_vs_lxd"] = p50(samples) * 1e3


def copy(setup: Setup, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    prepare(setup, daemon, args)
    source = lxd.PREFIX + "csrc"
    daemon.lxc("init", DEBIAN_ALIAS, source, "-s", POOL)
    names = [f"{lxd.PREFIX}c{i:02d}" for i in range(args.runs)]
    samples = [daemon.timed_lxc("copy", source, name) for name in names]
    say(f"  lxc copy (stopped)    {describe(samples)} ms")
    out["st_copy"] = p50(samples) * 1e3


def backup(setup: Setup, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    prepare(setup, daemon, args)
    name = lxd.PREFIX + "bsrc"
    daemon.lxc("init", DEBIAN_ALIAS, name, "-s", POOL)
    tarball = str(setup.work / "backup.tar.gz")
    extra = ["--optimized-storage"] if args.optimized else []
    exports, imports = [], []
    for _ in range(args.runs):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tarball)
        started = time.perf_counter()
        try:
            daemon.lxc("export", name, tarball, *extra)
        except BenchError as e:
            say(f"  skipped: `lxc export` is {UNSUPPORTED} ({e})")
            for key in BACKUP_KEYS:
                out[key] = f"backup: `lxc export` is {UNSUPPORTED}"
            return
        exports.append(time.perf_counter() - started)
        out["st_export_size"] = os.path.getsize(tarball) / 1048576
        daemon.lxc("delete", name)
        imports.append(daemon.timed_lxc("import", tarball, "--storage", POOL))
        if name not in daemon.instance_names():
            raise BenchError(f"{daemon.label}: `lxc import` made no instance {name}")
    os.unlink(tarball)
    say(f"  lxc export            {describe(exports)} ms")
    say(f"  lxc import            {describe(imports)} ms")
    out["st_export"], out["st_import"] = p50(exports) * 1e3, p50(imports) * 1e3


def pool_used_mib(daemon: Daemon) -> float:
    os.sync()  # btrfs reports what it has allocated: write back the delayed allocations
    time.sleep(1)
    resources = daemon.request("GET", f"/1.0/storage-pools/{POOL}/resources")
    return float(resources["space"]["used"]) / 1048576


def rootfs_mib(path: Path) -> float:
    """The unpacked size of a unified image's rootfs: the sum of its regular files."""
    total = 0
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.lstrip("./").startswith("rootfs/"):
                total += member.size
    return total / 1048576


def density(setup: Setup, daemon: Daemon, args: argparse.Namespace, out: Figures) -> None:
    ensure_pool(daemon, args)
    # the phase before deleted the image and the pool: its unpacked copy on the pool, made
    # by the first `lxc init`, is counted
    ensure_debian(setup, daemon)
    out["st_image_size"] = setup.image_mib
    before = pool_used_mib(daemon)
    names = [f"{lxd.PREFIX}n{i:03d}" for i in range(args.count)]
    daemon.lxc("init", DEBIAN_ALIAS, names[0], "-s", POOL)
    first = pool_used_mib(daemon)

    def init(name: str) -> None:
        daemon.lxc("init", DEBIAN_ALIAS, name, "-s", POOL)

    started = time.perf_counter()
    lxd.run_parallel(init, names[1:], args.parallel)
    wall = time.perf_counter() - started
    made = sum(1 for n in daemon.instance_names() if n in names)
    if made != args.count:
        raise BenchError(f"{daemon.label}: {made} of {args.count} containers were created")
    after = pool_used_mib(daemon)
    out["st_disk_first"] = first - before
    out["st_disk_each"] = (after - first) / max(1, args.count - 1)
    out["st_disk_all"] = after - before
    out["st_disk_ratio"] = 100 * (after - before) / max(first - before, 1e-3)
    out["st_disk_rootfs"] = 100 * (after - before) / setup.image_mib
    say(
        f"  pool used {before:.0f} -> {first:.0f} (1) -> {after:.0f} MiB ({args.count} "
        f"containers, the last {args.count - 1} created in {wall:.1f} s); image rootfs "
        f"{setup.image_mib:.0f} MiB"
    )
    daemon.delete(names, args.parallel)


# ---------------------------------------------------------------------------------------
# an isolated croft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def isolated_croft() -> Iterator[str]:
    """A croft under a temporary directory with its own bridge; yields its unix socket.
    Its teardown is tests/conftest.py's: `croft down`, then the containers, the bridge,
    dnsmasq and the nftables tables that `croft down` leaves for running instances."""
    root = Path(tempfile.mkdtemp(prefix="bench-croft-", dir="/tmp"))
    root.chmod(0o711)  # dnsmasq drops root: the state directory must be searchable
    bridge = "crbbr" + secrets.token_hex(3)
    table = "croft_bench_" + secrets.token_hex(3)
    config = root / "croft.yaml"
    endpoint = f"https://127.0.0.1:{free_port()}"
    config.write_text(
        f"member: bench\nstate_dir: {root}/state\nlog_dir: {root}/log\nrun_dir: {root}/run\n"
        f"etcd:\n  endpoints: [{endpoint}]\n  peer_port: {free_port()}\n"
        f'network:\n  default_bridge: "{bridge}"\n  nft_table: {table}\n'
    )
    env = {**os.environ, "CROFT_CONFIG": str(config)}
    croft = [sys.executable, "-m", "croft.client.cli"]
    say(f"# starting an isolated croft under {root}")
    try:
        subprocess.run([*croft, "up"], env=env, check=True, capture_output=True, timeout=300)
        yield str(root / "state" / "unix.socket")
    finally:
        say(f"# taking the isolated croft under {root} down")
        subprocess.run([*croft, "down"], env=env, check=False, capture_output=True, timeout=300)
        lxcpath = root / "state" / "lxc"
        if lxcpath.is_dir():
            for entry in lxcpath.iterdir():
                for cmd in ("lxc-stop", "-k"), ("lxc-destroy",):
                    subprocess.run(
                        [*cmd, "-P", str(lxcpath), "-n", entry.name], capture_output=True
                    )
        with contextlib.suppress(OSError, ValueError):
            pid = root / "state" / "networks" / bridge / "dnsmasq.pid"
            os.kill(int(pid.read_text().strip()), signal.SIGTERM)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        for name in (table, f"{table}.{bridge}"):
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)
        for mount in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            point = mount.split()[1]
            if point.startswith(str(root) + "/"):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=10, help="samples per timed figure")
    parser.add_argument("--count", type=int, default=100, help="containers in the density phase")
    parser.add_argument("--parallel", type=int, default=4, help="lxc init at a time (density)")
    parser.add_argument("--pool-size", default="10GiB", help="size= of the btrfs pool made")
    parser.add_argument("--debian-image", default=str(IMAGES_DIR / "debian12.tar.gz"))
    parser.add_argument(
        "--optimized", action="store_true", help="lxc export --optimized-storage (btrfs send)"
    )


PhaseRun = Callable[[Setup, Daemon, argparse.Namespace, Figures], None]
PHASES: list[tuple[str, tuple[str, ...], PhaseRun]] = [
    ("busybox", BUSYBOX_KEYS, busybox),
    ("debian", DEBIAN_KEYS, debian),
    ("copy", COPY_KEYS, copy),
    ("backup", BACKUP_KEYS, backup),
    ("density", DENSITY_KEYS, density),
]


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    arguments(parser)
    known, _ = parser.parse_known_args()
    argv = sys.argv[1:]
    at = argv.index("--compare") + 1 if "--compare" in argv else 0
    isolated = at and argv[at : at + 1] == ["isolated"]
    work = Path(tempfile.mkdtemp(prefix="bench-storage-", dir="/var/tmp"))
    try:
        setup = Setup(work)
        if Path(known.debian_image).is_file() and "-h" not in argv and "--help" not in argv:
            setup.debian = unique_copy(Path(known.debian_image), work / "debian12.tar.gz", NONCE)
            setup.fingerprint = sha256_file(setup.debian)
            setup.image_mib = rootfs_mib(setup.debian)
        phases = [Phase(title, keys, functools.partial(run, setup)) for title, keys, run in PHASES]
        hook = functools.partial(cleanup, setup)
        if not isolated:
            return lxd.main(__doc__ or "", phases, arguments, cleanup=hook)
        with isolated_croft() as sock:
            sys.argv[1 + at] = sock
            return lxd.main(__doc__ or "", phases, arguments, cleanup=hook)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
