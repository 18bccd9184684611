"""A croft cluster on one host, for tests and benchmarks: each member in its own network
namespace on a test bridge, with its own state directory and its own croft (node agent,
services, and on the first three an etcd voter), as LXD's own suite runs its clusters.

    with ClusterRig(root, size=3) as rig:      # m1 bootstraps, m2 and m3 join with tokens
        rig.members[1].address                 # 10.77.N.12
        rig.lxc(1, "cluster", "list")          # the real lxc, over HTTPS, to member 2

Topology: a bridge `crt<run>` holding 10.77.N.1/24 on the host (N picked free); member i
is the netns `croft-<run>-m<i>`, `eth0` = 10.77.N.(10+i), reached from the host through the
bridge. Its processes enter the netns only (`nsenter --net`): the mount namespace, and
with it /sys/fs/cgroup and the state directory, stays the host's, so the host reaches
each member's unix socket and kills its processes by pid.

Forming: m1 starts standalone and `lxc cluster enable m1`; each other member gets a token
from `lxc cluster add` on m1 and joins with `croft init --preseed` (LXD's `cluster:`
section with `cluster_token`), before its services start. The first three become the
store's voters. `stop()` (and leaving the `with`) removes every process, container,
namespace, veth and the bridge it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from croft.common.testing.host import croft_processes

CROFT = [sys.executable, "-m", "croft.client.cli"]


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _free_subnet() -> int:
    routes = _sh("ip", "-4", "route", "show").stdout
    taken = {int(p.split(".")[2]) for p in routes.split() if p.startswith("10.77.")}
    free = [n for n in range(1, 255) if n not in taken]
    return random.choice(free)


@dataclass
class Member:
    """One member: its netns, address, directories and croft configuration."""

    index: int  # 1-based
    name: str
    netns: str
    veth: str
    address: str
    root: Path
    gateway: str
    extra_config: str = ""

    @property
    def config_file(self) -> Path:
        return self.root / "croft.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def https(self) -> str:
        return f"{self.address}:8443"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CROFT_CONFIG": str(self.config_file)}

    def write_config(self, lease_ttl: int = 3) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        self.config_file.write_text(
            f"""member: {self.name}
state_dir: {self.state_dir}
log_dir: {self.root / "log"}
run_dir: {self.root / "run"}
etcd:
  endpoints: [https://{self.address}:2379]
  peer_port: 2380
rpc:
  host: {self.address}
registry:
  lease_ttl: {lease_ttl}
network:
  default_bridge: ""
api:
  https_address: "{self.https}"
{self.extra_config}
"""
        )

    def croft(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """`croft ARGS` run inside this member's network namespace."""
        result = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", *CROFT, *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"croft {' '.join(args)} on {self.name} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def processes(self) -> list[int]:
        """Pids of this member's croft processes (its config in their environment, or
        its etcd data directory on their command line)."""
        return croft_processes(self.config_file, self.state_dir / "etcd")

    def kill(self) -> None:
        """SIGKILL every croft process of this member (its containers keep running)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def up(self, timeout: float = 180) -> None:
        self.croft("up", "--timeout", str(timeout), timeout=timeout + 30)


@dataclass
class ClusterRig:
    """`size` members on a test bridge; see the module's docstring."""

    root: Path
    size: int = 3
    run: str = field(default_factory=lambda: secrets.token_hex(3))
    members: list[Member] = field(default_factory=list)
    bridge: str = ""
    subnet: int = 0
    startup_seconds: float = 0.0
    lxc_home: Path | None = None
    _spare: Member | None = None
    _extra: list[Member] = field(default_factory=list)

    # ------------------------------------------------------------------ network

    def _make_bridge(self) -> None:
        self.subnet = _free_subnet()
        self.bridge = f"crt{self.run}"
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"10.77.{self.subnet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")

    def add_member(self, extra_config: str = "") -> Member:
        """A new member's netns, wiring and configuration (not started)."""
        index = len(self.members) + len(self._extra) + 1
        member = Member(
            index=index,
            name=f"m{index}",
            netns=f"croft-{self.run}-m{index}",
            veth=f"crv{self.run}{index}"[:15],
            address=f"10.77.{self.subnet}.{10 + index}",
            root=self.root / f"m{index}",
            gateway=f"10.77.{self.subnet}.1",
            extra_config=extra_config,
        )
        self.members.append(member)
        # Left by an earlier run against an attached rig: made afresh.
        _sh("ip", "link", "del", member.veth, check=False)
        _sh("ip", "netns", "del", member.netns, check=False)
        _sh("ip", "netns", "add", member.netns)
        _sh("ip", "link", "add", member.veth, "type", "veth", "peer", "name", "eth0",
            "netns", member.netns)  # fmt: skip
        _sh("ip", "link", "set", member.veth, "master", self.bridge, "up")
        ns = ("ip", "-n", member.netns)
        _sh(*ns, "addr", "add", f"{member.address}/24", "dev", "eth0")
        _sh(*ns, "link", "set", "eth0", "up")
        _sh(*ns, "link", "set", "lo", "up")
        _sh(*ns, "route", "add", "default", "via", member.gateway)
        member.write_config()
        return member

    def spare_member(self) -> Member:
        """A member wired and configured but not started nor joined (for join tests);
        the same one on every call."""
        if self._spare is None:
            self._spare = self.add_member()
            self.members.remove(self._spare)
            self._extra.append(self._spare)
        return self._spare

    def extra_member(self) -> Member:
        """A new member wired and configured but not started nor joined, outside
        `members` (a test joins it for a while); torn down with the rig."""
        member = self.add_member()
        self.members.remove(member)
        self._extra.append(member)
        return member

    # ------------------------------------------------------------------ lxc

    def lxc(
        self, member: int, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """The real `lxc` as the test's client, over HTTPS to `members[member]` (0-based),
        with one client certificate trusted by the whole cluster."""
        assert self.lxc_home is not None
        remote = self.members[member].name
        argv = list(args)
        # The remote goes on the first argument that names an object, as `lxc` reads it.
        result = subprocess.run(
            ["lxc", *_with_remote(argv, remote)],
            env={**os.environ, "HOME": str(self.lxc_home), "LXD_DIR": "/nonexistent"},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"lxc {' '.join(args)} on {remote} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def lxc_json(self, member: int, *args: str) -> Any:
        return json.loads(self.lxc(member, *args, "--format", "json").stdout)

    def query(self, member: int, path: str, method: str = "GET", data: Any = None) -> Any:
        args = ["query", "-X", method, f"{self.members[member].name}:{path}"]
        if data is not None:
            args += ["-d", json.dumps(data)]
        result = subprocess.run(
            ["lxc", *args],
            env={**os.environ, "HOME": str(self.lxc_home), "LXD_DIR": "/nonexistent"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"lxc {' '.join(args)}: {result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def local_lxc(self, member: int, *args: str) -> subprocess.CompletedProcess[str]:
        """`lxc` on a member's unix socket (as root on that member)."""
        home = self.root / "local-home"
        home.mkdir(exist_ok=True)
        return subprocess.run(
            ["lxc", *args],
            env={**os.environ, "HOME": str(home), "LXD_DIR": str(self.members[member].state_dir)},
            capture_output=True,
            text=True,
            timeout=180,
        )

    def _trust_client(self) -> None:
        self.lxc_home = self.root / "client-home"
        self.lxc_home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(self.lxc_home), "LXD_DIR": "/nonexistent"}
        token = self.local_lxc(0, "config", "trust", "add", "--name", "rig", "-q").stdout.strip()
        _sh_env(env, "lxc", "remote", "add", self.members[0].name, token)

    def add_remote(self, member: Member) -> None:
        """A remote for `member` in the test client (trusted already: one trust covers
        every member, which serves the cluster's certificate)."""
        assert self.lxc_home is not None
        env = {**os.environ, "HOME": str(self.lxc_home), "LXD_DIR": "/nonexistent"}
        # Left by an earlier run against an attached rig.
        subprocess.run(["lxc", "remote", "remove", member.name], env=env, capture_output=True,
                       timeout=60)  # fmt: skip
        _sh_env(env, "lxc", "remote", "add", member.name, f"https://{member.https}",
                "--accept-certificate")  # fmt: skip

    # ------------------------------------------------------------------ forming

    def join(self, member: Member, via: int = 0) -> None:
        """`lxc cluster add` on members[via], then `croft init --preseed` on `member`."""
        token = self.lxc(via, "cluster", "add", member.name, "-q").stdout.strip()
        token = token.splitlines()[-1].strip()
        preseed = (
            "cluster:\n"
            f"  server_name: {member.name}\n"
            "  enabled: true\n"
            f"  server_address: {member.https}\n"
            f"  cluster_token: {token}\n"
        )
        member.croft("init", "--preseed", input=preseed, timeout=240)
        self.add_remote(member)

    def start(self) -> ClusterRig:
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        try:
            self._make_bridge()
            first = self.add_member()
            first.up()
            self._trust_client()
            result = self.local_lxc(0, "cluster", "enable", first.name)
            if result.returncode != 0:
                raise RuntimeError(f"lxc cluster enable: {result.stderr}")
            for _ in range(self.size - 1):
                self.join(self.add_member())
            self.wait_online()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        self.save()
        return self

    def save(self) -> None:
        """Write what `attach` needs to `<root>/rig.json`."""
        state = {
            "size": self.size,
            "run": self.run,
            "bridge": self.bridge,
            "subnet": self.subnet,
            "members": [m.index for m in self.members],
            "startup_seconds": self.startup_seconds,
        }
        (self.root / "rig.json").write_text(json.dumps(state))

    @classmethod
    def attach(cls, root: Path) -> ClusterRig:
        """A rig started before (by another process, kept with CROFT_TEST_KEEP), to run
        tests against it again without forming a new one."""
        state = json.loads((root / "rig.json").read_text())
        rig = cls(root, size=state["size"], run=state["run"], bridge=state["bridge"],
                  subnet=state["subnet"], startup_seconds=state["startup_seconds"],
                  lxc_home=root / "client-home")  # fmt: skip
        for index in state["members"]:
            rig.members.append(
                Member(
                    index=index,
                    name=f"m{index}",
                    netns=f"croft-{rig.run}-m{index}",
                    veth=f"crv{rig.run}{index}"[:15],
                    address=f"10.77.{rig.subnet}.{10 + index}",
                    root=root / f"m{index}",
                    gateway=f"10.77.{rig.subnet}.1",
                )
            )
        return rig

    def wait_online(self, timeout: float = 60) -> None:
        """Until every member is Online with a heartbeat (polled, no bare sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.lxc_json(0, "cluster", "list")
            if len(rows) == len(self.members) and all(r["status"] == "Online" for r in rows):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"members not all Online: {rows}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        for member in reversed(self.members + self._extra):
            with contextlib.suppress(Exception):
                member.croft("down", check=False, timeout=90)
            member.kill()
            lxcpath = member.state_dir / "lxc"
            if lxcpath.is_dir():
                for entry in lxcpath.iterdir():
                    _sh("lxc-stop", "-k", "-P", str(lxcpath), "-n", entry.name, check=False)
                    _sh("lxc-destroy", "-P", str(lxcpath), "-n", entry.name, check=False)
            _sh("ip", "link", "del", member.veth, check=False)
            _sh("ip", "netns", "del", member.netns, check=False)
        if self.bridge:
            _sh("ip", "link", "del", self.bridge, check=False)
        if not os.environ.get("CROFT_TEST_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ClusterRig:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _sh_env(env: dict[str, str], *argv: str) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


# lxc subcommands whose first positional argument names a remote object.
_NO_REMOTE_OPTS = ("--format", "--target", "-c", "--columns", "--type", "--mode")


def _with_remote(argv: list[str], remote: str) -> list[str]:
    """`lxc list` -> `lxc list m2:`; `lxc launch busybox c1` -> `... busybox m2:c1` needs
    the caller's care, so only a few shapes are rewritten: the rest the caller writes
    with the remote itself (`m2:c1`)."""
    if ":" in " ".join(argv):
        return argv
    head = argv[0] if argv else ""
    if head in ("list", "ls", "info", "version"):
        return [head, f"{remote}:", *argv[1:]]
    if head == "cluster" and len(argv) >= 2:
        sub = argv[1]
        rest = argv[2:]
        if sub in ("list", "ls", "list-tokens"):
            return ["cluster", sub, f"{remote}:", *rest]
        if sub in ("enable",):
            return ["cluster", sub, f"{remote}:", *rest]
        if rest:
            return ["cluster", sub, f"{remote}:{rest[0]}", *rest[1:]]
    if head == "config" and len(argv) >= 2 and argv[1] in ("get", "set", "unset", "show"):
        return ["config", argv[1], f"{remote}:", *argv[2:]]
    return argv
