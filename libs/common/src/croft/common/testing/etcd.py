"""Real etcd processes for tests and benchmarks: one member (`EtcdServer`) or a cluster on
loopback (`EtcdCluster`), each in its own temporary directory on free ports.

    with EtcdCluster(size=3) as cluster:
        store = EtcdStore(cluster.endpoints)
        ...
        cluster.kill(cluster.leader())

Members log to `<dir>/<name>.log`; a member that does not come up raises an error quoting
the end of its log. Everything started here is killed at interpreter exit if the caller
forgot to stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from croft.common.errors import Internal, Unavailable
from croft.common.store.etcd import EtcdStore
from croft.etcdpb import rpc_pb2, rpc_pb2_grpc

ETCD_BINARY = "/usr/bin/etcd"
_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live):
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, initial_cluster: str, token: str, extra_args: Sequence[str]) -> None:
        argv = [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _live.add(self.process)

    def healthy(self) -> bool:
        """True when this member answers /health with a leader."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def status(self, timeout: float = 2.0) -> rpc_pb2.StatusResponse:
        """Maintenance.Status of this member (raises grpc.RpcError when it does not answer)."""
        with grpc.insecure_channel(f"127.0.0.1:{self.client_port}") as channel:
            stub = rpc_pb2_grpc.MaintenanceStub(channel)
            response: rpc_pb2.StatusResponse = stub.Status(rpc_pb2.StatusRequest(), timeout=timeout)
            return response

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _live.discard(self.process)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


class EtcdCluster:
    """`size` etcd members on 127.0.0.1, each with its own data dir under one temp dir.

    `start()` returns when every member reports a leader (about 1-2 s for three). `stop()`
    stops them (SIGTERM, then SIGKILL) and removes the temp dir; `kill(i)` SIGKILLs one."""

    def __init__(
        self,
        size: int = 3,
        *,
        prefix: str = "croft-etcd-",
        start_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.size = size
        self.prefix = prefix
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.dir = ""
        self.members: list[EtcdMember] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> EtcdCluster:
        # Free ports can be taken by someone else between probe and bind: try again afresh.
        for attempt in range(3):
            self.dir = tempfile.mkdtemp(prefix=self.prefix)
            token = os.path.basename(self.dir)
            self.members = [
                EtcdMember(
                    name=f"{token}-{i}",
                    client_port=free_port(),
                    peer_port=free_port(),
                    data_dir=os.path.join(self.dir, f"member-{i}"),
                    log_path=os.path.join(self.dir, f"member-{i}.log"),
                )
                for i in range(self.size)
            ]
            initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.start(initial, token, self.extra_args)
            try:
                self._wait_healthy()
                return self
            except Internal:
                self.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.members)
        while pending:
            for member in list(pending):
                if not member.running:
                    raise Internal(
                        f"etcd member {member.name} exited while starting:\n{member.log_tail()}"
                    )
                if member.healthy():
                    pending.remove(member)
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"{m.name}:\n{m.log_tail()}" for m in pending)
                raise Internal(f"etcd not healthy after {self.start_timeout:g}s:\n{tails}")
            time.sleep(0.05)

    def leader(self) -> int:
        """Index of the member the running members agree leads the cluster."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            ids: dict[int, int] = {}
            leaders: set[int] = set()
            for i, member in enumerate(self.members):
                if not member.running:
                    continue
                try:
                    status = member.status()
                except grpc.RpcError:
                    continue
                ids[status.header.member_id] = i
                leaders.add(status.leader)
            if len(leaders) == 1:
                (leader,) = leaders
                if leader in ids:
                    return ids[leader]
            time.sleep(0.05)
        raise Unavailable(f"the etcd cluster in {self.dir} agrees on no leader")

    def kill(self, index: int) -> None:
        """SIGKILL member `index` (its data dir stays, as after a crash)."""
        member = self.members[index]
        member.signal(signal.SIGKILL)
        member.wait()

    def restart(self, index: int) -> None:
        """Start member `index` again on its data dir (after `kill`), and wait until the
        cluster is healthy."""
        member = self.members[index]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.start(initial, os.path.basename(self.dir), self.extra_args)
        self._wait_healthy()

    def stop(self) -> None:
        # A member that lost its peers can linger in a graceful stop (leadership transfer);
        # the data is thrown away anyway, so it gets 1 s before SIGKILL.
        for member in self.members:
            member.signal(signal.SIGTERM)
        for member in self.members:
            member.wait(timeout=1.0)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EtcdServer:
    """One etcd member on 127.0.0.1 (a single-node croft's store)."""

    def __init__(
        self,
        *,
        prefix: str = "croft-etcd-",
        start_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.cluster = EtcdCluster(
            1, prefix=prefix, start_timeout=start_timeout, extra_args=extra_args
        )

    @property
    def member(self) -> EtcdMember:
        return self.cluster.members[0]

    @property
    def endpoint(self) -> str:
        return self.member.endpoint

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    def start(self) -> EtcdServer:
        self.cluster.start()
        return self

    def stop(self) -> None:
        """SIGTERM, wait, and remove the data dir."""
        self.cluster.stop()

    def kill(self) -> None:
        """SIGKILL the member, as a crash would (the data dir stays until `stop()`)."""
        self.cluster.kill(0)

    def restart(self) -> None:
        """Start the member again on its data dir, after `kill`."""
        self.cluster.restart(0)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def compact(endpoint: str, revision: int) -> None:
    """Compact the store's history up to `revision` (a test of watches on lost history)."""
    target = endpoint.split("://", 1)[-1]
    with grpc.insecure_channel(target) as channel:
        rpc_pb2_grpc.KVStub(channel).Compact(
            rpc_pb2.CompactionRequest(revision=revision, physical=True), timeout=10
        )


@contextlib.asynccontextmanager
async def etcd_store(endpoints: Sequence[str], *, timeout: float = 5.0) -> AsyncIterator[EtcdStore]:
    """An started `EtcdStore` on `endpoints`, closed on exit (for tests and benches)."""
    store = EtcdStore(endpoints, timeout=timeout)
    await store.start()
    try:
        yield store
    finally:
        await store.close()
