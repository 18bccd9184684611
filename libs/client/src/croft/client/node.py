"""Talking to this host's node agent: start it, ask it, stop it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from croft.common.clients import NodeClient
from croft.common.config import Config, ConfigError, load_config
from croft.common.errors import Unavailable
from croft.node.agent import SERVICES
from croft.v1 import node_pb2


def _socket(config: Config) -> Path:
    return config.run_dir / "node.sock"


def agent_pid(config: Config) -> int | None:
    """The pid of the running node agent, or None. A pid file left by a killed agent may
    name a process that reused its pid (pids wrap at 32768 here): only a node agent counts."""
    try:
        pid = int((config.run_dir / "node.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"croft.node" in cmdline else None


def agent(config: Config) -> NodeClient:
    """The client of this host's node agent, at its socket in the run directory."""
    return NodeClient(f"unix:{_socket(config)}")


async def node_status(config: Config) -> node_pb2.NodeStatusReply:
    return await agent(config).status(node_pb2.NodeStatusRequest())


def spawn_agent(config: Config) -> int:
    """Start the node agent detached from this terminal; returns its pid."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(config.log_dir / "node.log", "ab")  # noqa: SIM115 (handed to the child)
    process = subprocess.Popen(
        [sys.executable, "-m", "croft.node"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd="/",
    )
    log.close()
    return process.pid


async def wait_ready(config: Config, pid: int, timeout: float) -> node_pb2.NodeStatusReply:
    """Wait until every supervised process is running; raise with the agent's log tail if
    the agent dies or time runs out."""
    deadline = time.monotonic() + timeout
    last: node_pb2.NodeStatusReply | None = None
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise Unavailable(f"the node agent exited during start-up:\n{log_tail(config)}")
        try:
            last = await node_status(config)
        except Exception:
            last = None
        # Every service must be there, not only what runs so far: while the agent is still
        # starting etcd, etcd is all it reports, and all of that is running.
        if (
            last is not None
            and {p.service for p in last.processes} >= {"etcd", *SERVICES} - _not_run(_now(config))
            and all(p.state == "running" for p in last.processes)
        ):
            return last
        await asyncio.sleep(0.1)
    waiting = [f"{p.service}-{p.index}: {p.state}" for p in (last.processes if last else [])]
    raise Unavailable(f"croft did not become ready within {timeout:g}s ({', '.join(waiting)})")


def _now(config: Config) -> Config:
    """The configuration as the agent reads it now: a voter that found its etcd removed
    from the store at start runs none (croft.node.voters rewrote its cluster.yaml)."""
    try:
        return load_config()
    except ConfigError:
        return config


def _not_run(config: Config) -> set[str]:
    return set() if config.etcd.embedded else {"etcd"}


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and exited
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def log_tail(config: Config, lines: int = 15) -> str:
    try:
        text = (config.log_dir / "node.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


async def stop_agent(config: Config, pid: int, timeout: float = 60.0) -> None:
    try:
        await agent(config).shutdown(node_pb2.ShutdownRequest(), timeout=5)
    except Exception:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            break
        await asyncio.sleep(0.05)
