"""Fixtures for cross-service tests: an isolated croft (own config, ports, dirs) on this host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CROFT = [sys.executable, "-m", "croft.client.cli"]


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

    def processes(self) -> list[int]:
        """Pids of every process that belongs to this croft: ones started with its config,
        and etcd serving its data directory."""
        mine = []
        marker = f"CROFT_CONFIG={self.config_file}".encode()
        data_dir = str(self.root / "state" / "etcd").encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") or data_dir in cmdline:
                mine.append(int(entry.name))
        return mine


def make_croft(root: Path, lease_ttl: int = 2, extra: str = "", bridge: str = "") -> Croft:
    """A croft living under `root`. With no `bridge` its network service makes no
    default network (the host's interfaces and firewall stay untouched)."""
    client, peer = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{client}"
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
