"""Fixtures for cross-service tests: an isolated croft (own config, ports, dirs) on this host."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from croft.common import internal_tls
from croft.common.internal_tls import Identity
from croft.common.store import Store, connect
from croft.common.testing.host import croft_processes, mounts_under

CROFT = [sys.executable, "-m", "croft.client.cli"]
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Croft:
    """A croft configured to live entirely under `root`, driven through the `croft` command."""

    root: Path
    config_file: Path
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CROFT_CONFIG": str(self.config_file)}

    @property
    def identity(self) -> Identity | None:
        """This croft's internal certificate (its etcd and gRPC ask for it)."""
        return internal_tls.load(self.root / "state")

    async def connect(self) -> Store:
        """This croft's store, reached as its services reach it."""
        return await connect([self.endpoint], self.identity)

    def etcdctl(self, *args: str) -> list[str]:
        """`etcdctl` aimed at this croft's etcd, with its certificate."""
        identity = self.identity
        tls = []
        if identity is not None:
            tls = [f"--cacert={identity.ca_path}", f"--cert={identity.cert_path}",
                   f"--key={identity.key_path}"]  # fmt: skip
        return ["etcdctl", f"--endpoints={self.endpoint}", *tls, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*CROFT, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"croft {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def status(self) -> list[dict]:
        return json.loads(self.run("status", "--format", "json", check=False).stdout)["instances"]

    def serving_pid(self, service: str, other_than: int = 0) -> int:
        """The pid of the live, healthy `service` (not `other_than`), or 0."""
        for row in self.status():
            pid = int(row.get("pid") or 0)
            if (
                row["service"] == service
                and row["health"] == "SERVING"
                and pid not in (0, other_than)
                and Path(f"/proc/{pid}").exists()
            ):
                return pid
        return 0

    def unmount_pools(self) -> None:
        """Unmount whatever is mounted in the pools other than the default one (a btrfs
        pool a test made, or what a failed test left): croft's teardown removes the tree,
        which must not reach into a mounted pool."""
        pools = self.root / "state" / "storage-pools"
        for point in sorted(mounts_under(pools), key=len, reverse=True):
            if point != str(pools / "default"):
                subprocess.run(["umount", "-l", point], capture_output=True)

    def processes(self) -> list[int]:
        """Pids of every process that belongs to this croft: ones started with its config,
        and etcd serving its data directory."""
        return croft_processes(self.config_file, self.root / "state" / "etcd")


def make_croft(root: Path, lease_ttl: int = 2, extra: str = "", bridge: str = "") -> Croft:
    """A croft living under `root`. With no `bridge` its network service makes no
    default network (the host's interfaces and firewall stay untouched)."""
    client, peer = free_port(), free_port()
    endpoint = f"https://127.0.0.1:{client}"
    config = root / "croft.yaml"
    config.write_text(
        f"""
member: testnode
state_dir: {root / "state"}
log_dir: {root / "log"}
run_dir: {root / "run"}
etcd:
  endpoints: [{endpoint}]
  peer_port: {peer}
registry:
  lease_ttl: {lease_ttl}
network:
  default_bridge: "{bridge}"
  nft_table: croft_test_{root.name.replace("-", "_")[-20:]}
{extra}
"""
    )
    return Croft(root, config, endpoint)


@pytest.fixture
def croft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("croft")


@pytest.fixture(scope="module")
def running_croft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Croft]:
    """One croft brought up for a whole test module, brought down after."""
    croft = make_croft(tmp_path_factory.mktemp("croft"))
    croft.run("up")
    try:
        yield croft
    finally:
        croft.run("down", check=False)


# ---------------------------------------------------------------------------- end to end


@dataclass
class Lxc:
    """The real `lxc` client (Debian's lxd-client 5.0.2) pointed at a croft."""

    lxd_dir: Path
    home: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LXD_DIR": str(self.lxd_dir), "HOME": str(self.home)}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["lxc", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"lxc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--format", "json").stdout)

    def refused(self, *args: str) -> str:
        """The error `lxc ARGS` prints, asserting that it fails."""
        result = self(*args, check=False)
        assert result.returncode != 0, f"lxc {' '.join(args)} succeeded: {result.stdout}"
        return result.stderr.strip().removeprefix("Error: ")

    def names(self, *args: str) -> list[str]:
        """The sorted names `lxc ARGS --format json` lists."""
        return sorted(item["name"] for item in self.json(*args))


def _remove_network(croft: Croft, bridge: str) -> None:
    """What `croft down` leaves for running instances' sake: the bridge, its dnsmasq and
    nft table. Tests remove them."""
    pid_file = croft.root / "state" / "networks" / bridge / "dnsmasq.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    table = yaml.safe_load(croft.config_file.read_text())["network"]["nft_table"]
    for name in (table, f"{table}.{bridge}"):  # each network has its own table
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)
    # NIC MAC/IP filters are in a bridge-family table of the network's name.
    subprocess.run(["nft", "delete", "table", "bridge", f"{table}.{bridge}"], capture_output=True)


def _remove_containers(croft: Croft) -> None:
    lxcpath = croft.root / "state" / "lxc"
    if not lxcpath.is_dir():
        return
    for entry in lxcpath.iterdir():
        subprocess.run(
            ["lxc-stop", "-k", "-P", str(lxcpath), "-n", entry.name], capture_output=True
        )
        subprocess.run(["lxc-destroy", "-P", str(lxcpath), "-n", entry.name], capture_output=True)


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """croft's busybox image, built from its definition."""
    from croft.imageformat.builder import build_image

    out = tmp_path_factory.mktemp("images") / "busybox.tar.gz"
    build_image(REPO / "services/images/definitions/busybox.yaml", out)
    return out


@pytest.fixture(scope="module")
def c1(croft_lxc: tuple[Croft, Lxc, str], busybox_image: Path) -> str:
    """A running busybox container c1 (the image imported as busybox)."""
    _, lxc, _ = croft_lxc
    lxc("image", "import", str(busybox_image), "--alias", "busybox")
    lxc("launch", "busybox", "c1")
    return "c1"


@pytest.fixture(scope="module")
def croft_lxc() -> Iterator[tuple[Croft, Lxc, str]]:
    """A running croft with its own bridge, and the `lxc` client aimed at its socket."""
    with started_croft_lxc() as started:
        yield started


@contextlib.contextmanager
def started_croft_lxc(extra: str = "") -> Iterator[tuple[Croft, Lxc, str]]:
    """croft_lxc's croft, with `extra` configuration."""
    # dnsmasq drops root, so the state directory must be searchable by others: not
    # pytest's 0700 temp dirs.
    root = Path(tempfile.mkdtemp(prefix="croft-e2e-", dir="/tmp"))
    root.chmod(0o711)
    bridge = "crtbr" + secrets.token_hex(3)
    croft = make_croft(root, lease_ttl=3, bridge=bridge, extra=extra)
    home = root / "home"
    home.mkdir()
    lxc = Lxc(root / "state", home)
    try:
        # Inside: a croft that did not become ready (a loaded host) still goes down.
        croft.run("up")
        yield croft, lxc, bridge
    finally:
        with contextlib.suppress(Exception):
            for name in lxc.json("list"):
                lxc("delete", "--force", name["name"], check=False)
        croft.run("down", check=False)
        _remove_containers(croft)
        _remove_network(croft, bridge)
        if not os.environ.get("CROFT_TEST_KEEP"):  # keep logs for a post-mortem when asked
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- clusters


@pytest.fixture(scope="session")
def cluster_rig() -> Iterator[Any]:
    """Three croft members in their own network namespaces on a test bridge, formed into
    one cluster through `lxc cluster enable` and `croft init --preseed` join tokens
    (croft.common.testing.cluster). Started once per session: it is expensive."""
    from croft.common.testing.cluster import ClusterRig

    kept = os.environ.get("CROFT_TEST_RIG", "")
    if kept and (Path(kept) / "rig.json").exists():
        # A rig a former run kept (CROFT_TEST_KEEP=1 CROFT_TEST_RIG=DIR): reused, and kept.
        yield ClusterRig.attach(Path(kept))
        return
    root = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="croft-cluster-", dir="/tmp"))
    rig = ClusterRig(root, size=3)
    rig.start()
    print(f"cluster rig of 3 members formed in {rig.startup_seconds:.1f}s")
    keep = bool(kept and os.environ.get("CROFT_TEST_KEEP"))
    if not keep:
        _RIG_STOPS.append(rig.stop)
    try:
        yield rig
    finally:
        _stop_rig()


# The rig's stop, run once: after the last test that uses the rig (pytest_runtest_teardown)
# rather than at the end of the session, so that three idle members do not compete with
# every later test for this host's two cores.
_RIG_STOPS: list[Any] = []
_LAST_RIG_TEST: list[str] = []


def _stop_rig() -> None:
    while _RIG_STOPS:
        _RIG_STOPS.pop()()


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected what will not run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [i.nodeid for i in items if "cluster_rig" in getattr(i, "fixturenames", ())]
    _LAST_RIG_TEST[:] = users[-1:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield  # the item's own fixtures (the modules' `rig`) are torn down first
    if _LAST_RIG_TEST and item.nodeid == _LAST_RIG_TEST[0]:
        _stop_rig()
