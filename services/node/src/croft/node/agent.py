"""The node agent: runs etcd and the croft services of this host and keeps them running.

Start order is etcd, then the per-host and control-plane services, the api last; stop is
the reverse. The agent serves `croft.v1.Node` on `<run_dir>/node.sock` (root only) for the
`croft` command: status, scale, shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from croft.common import cluster, cluster_join, discovery, internal_tls, telemetry
from croft.common.cluster_store import own_role, promote_learner
from croft.common.config import Config
from croft.common.errors import InvalidArgument, NotFound, Unavailable
from croft.common.internal_tls import Identity
from croft.common.rpc import Server
from croft.common.service import connect_store
from croft.common.store import Store, dump
from croft.node import voters
from croft.node.supervisor import Child
from croft.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

# Start order. Per-host services run exactly once per host; the others scale.
SERVICES = ("storage", "network", "images", "auth", "compute", "api")
PER_HOST = frozenset({"compute", "storage", "network"})


MAX_REPLICAS = 16


def check_replicas(service: str, replicas: int) -> None:
    """Refuse a replica count the agent would not run (what `croft scale` may ask)."""
    if service not in SERVICES:
        raise NotFound(f"unknown service {service!r} (known: {', '.join(SERVICES)})")
    if service in PER_HOST and replicas != 1:
        raise InvalidArgument(f"{service} runs exactly once per host; it cannot be scaled")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"replicas must be between 0 and {MAX_REPLICAS}")


async def record_scale(store: Store, member: str, service: str, replicas: int) -> None:
    """Record that `member` runs `replicas` of `service` (its node agent follows the
    record). Refused when it would leave the cluster without any replica of it."""
    check_replicas(service, replicas)
    if replicas == 0:
        elsewhere = [i for i in await discovery.resolve(store, service) if i.member != member]
        if not elsewhere:
            raise InvalidArgument(
                f"{service} would run nowhere: no other member runs it "
                f"(scale it up on another member first)"
            )
    key = cluster.scale_key(member)
    found = await store.get_json(key)
    recorded = dict(found[0]) if found is not None else {}
    recorded[service] = replicas
    await store.put(key, dump(recorded))


def socket_path(config: Config) -> Path:
    return config.run_dir / "node.sock"


def pid_path(config: Config) -> Path:
    return config.run_dir / "node.pid"


def etcd_health(endpoint: str, timeout: float = 1.0, identity: Identity | None = None) -> bool:
    context = (
        identity.ssl_context() if identity is not None and endpoint.startswith("https:") else None
    )
    try:
        with urllib.request.urlopen(
            f"{endpoint}/health", timeout=timeout, context=context
        ) as reply:
            return b'"health":"true"' in reply.read()
    except OSError:
        return False


def _ip(host: str) -> str:
    """`host` when it is an IP address, else ''."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return ""


class Agent(node_pb2_grpc.NodeServicer):
    def __init__(self, config: Config) -> None:
        self.config = config
        # This member's certificate for its etcd and its services' gRPC: made at first
        # start, valid for the address its etcd listens on.
        # (A member running no etcd names its own address, not a voter's it connects to.)
        host = (urlsplit(config.etcd.endpoints[0]).hostname or "") if config.etcd.embedded else ""
        self.identity = internal_tls.ensure(config.state_dir, _ip(host) or _ip(config.rpc.host))
        self.etcd: Child | None = None
        self.children: dict[str, list[Child]] = {name: [] for name in SERVICES}
        self.store: Store | None = None
        self.stopping = asyncio.Event()
        self.restart = False  # set when the agent stops to start again (a rename)
        self._scale_lock = asyncio.Lock()
        self._joined = False  # this member's record is no longer a join under way
        self._promotion: asyncio.Task[None] | None = None
        self._beats = 0

    # ------------------------------------------------------------------ processes

    def _service_child(self, service: str, index: int) -> Child:
        label = service if index == 1 else f"{service}-{index}"
        return Child(
            name=service,
            index=index,
            argv=[sys.executable, "-m", f"croft.{service}"],
            log_file=self.config.log_dir / f"{label}.log",
            env={"CROFT_REPLICA": str(index)},
        )

    async def start_etcd(self) -> None:
        endpoint = self.config.etcd.endpoints[0]
        if not self.config.etcd.embedded:
            return
        if etcd_health(endpoint, identity=self.identity):
            raise Unavailable(f"an etcd already answers on {endpoint}; is another croft running?")
        etcd = self.config.etcd
        clustered = bool(etcd.initial_cluster)
        self.etcd = Child(
            name="etcd",
            index=1,
            argv=etcd_argv(self.config, self.identity),
            log_file=self.config.log_dir / "etcd.log",
            # Go's scheduler spends much of etcd's CPU waking, spinning and switching
            # threads (perf on 2 vCPUs: a quarter in finish_task_switch, a tenth in
            # nanosleep). One P cut etcd's CPU per write from 630 to 560 us and per
            # launch from ~8.1 to ~7.0 ms; fsyncs still run beside it, each on its own
            # thread, and one core is far more than croft's writes need.
            env=_max_procs(self.config.etcd.max_procs),
        )
        self.etcd.start()
        # A joining member's etcd starts as a learner; it is promoted to voter by the
        # cluster once it caught up (etcd refuses before).
        promote = etcd.initial_cluster_state == "existing"
        deadline = time.monotonic() + (120 if clustered else 30)
        while time.monotonic() < deadline:
            if promote:
                promote = not await promote_learner(
                    etcd.endpoints, self.config.member, self.identity
                )
            if not promote and await asyncio.to_thread(etcd_health, endpoint, 0.5, self.identity):
                self.etcd.state = "running"
                return
            if self.etcd.state == "restarting" and not clustered:
                break
            await asyncio.sleep(0.1 if not promote else 0.5)
        raise Unavailable(f"etcd did not become healthy; see {self.etcd.log_file}")

    async def set_replicas(self, service: str, replicas: int) -> None:
        check_replicas(service, replicas)
        async with self._scale_lock:
            running = self.children[service]
            while len(running) < replicas:
                child = self._service_child(service, len(running) + 1)
                running.append(child)
                child.start()
            while len(running) > replicas:
                await running.pop().stop()

    async def refresh_states(self) -> None:
        """A child is running once it registered itself (same pid) in discovery."""
        if self.store is None:
            return
        try:
            live = await discovery.resolve(self.store, None, self.config.member)
        except Exception:  # the store may be briefly unreachable; keep the last states
            return
        pids = {i.pid for i in live}
        for children in self.children.values():
            for child in children:
                if child.pid and child.pid in pids:
                    child.state = "running"
                elif child.pid and child.state == "running":
                    child.state = "starting"

    def _process_states(self) -> list[node_pb2.ProcessState]:
        every = ([self.etcd] if self.etcd else []) + [
            c for name in SERVICES for c in self.children[name]
        ]
        return [
            node_pb2.ProcessState(
                service=c.name,
                index=c.index,
                pid=c.pid,
                state=c.state,
                restarts=c.restarts,
                started_at=c.started_at,
                log_file=str(c.log_file),
            )
            for c in every
        ]

    async def run(self) -> None:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        sock = socket_path(self.config)
        sock.unlink(missing_ok=True)
        server = Server(
            "node", self.config.member, f"node-{os.getpid()}", host=self.config.rpc.host
        )
        node_pb2_grpc.add_NodeServicer_to_server(self, server.grpc)
        await server.start(unix_path=str(sock))
        os.chmod(sock, 0o600)
        pid_path(self.config).write_text(f"{os.getpid()}\n")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            # A running croft that joined a cluster (`PUT /1.0/cluster`) restarts into it:
            # its standalone store goes aside before its etcd starts as the cluster's.
            if cluster_join.finish_pending_join(self.config):
                log.info("joined a cluster: the standalone store is set aside")
            await voters.leave_if_removed(self)
            await self.start_etcd()
            self.store = await connect_store(self.config)
            recorded = await self._recorded_scale()
            replicas = self.config.services
            for service in SERVICES:
                wanted = recorded.get(service, getattr(replicas, service).replicas or 1)
                await self.set_replicas(service, wanted)
            heartbeats = asyncio.create_task(self._heartbeats(), name="heartbeats")
            while not self.stopping.is_set():
                # Only while a child has yet to register: reading the registry twice a
                # second cost this agent ~5 ms of CPU a second, and etcd some more. Status
                # reads it anyway before it answers.
                if any(c.state != "running" for cs in self.children.values() for c in cs):
                    await self.refresh_states()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 0.5)
            heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeats
        finally:
            await self.shutdown_children()
            if self.store is not None:
                await self.store.close()
            await server.stop(grace=1.0)
            sock.unlink(missing_ok=True)
            pid_path(self.config).unlink(missing_ok=True)

    async def _heartbeats(self) -> None:
        """Once this member is in a cluster, write its heartbeat every HEARTBEAT_INTERVAL
        with the role its etcd reports: the cluster sees it Online, and its roles."""
        assert self.store is not None
        while True:
            try:
                await self._apply_scale()
            except Exception as exc:  # noqa: BLE001 (again at the next beat)
                log.warning("cannot apply the recorded scale: %s", exc)
            with contextlib.suppress(Exception):
                renamed = await self.store.get_json(cluster.renamed_key(self.config.member))
                if renamed is not None:
                    await self._move_scale_record(str(renamed[0]["name"]))
                    self._take_new_name(str(renamed[0]["name"]))
                    await self.store.delete(cluster.renamed_key(self.config.member))
                    self.restart = True
                    self.stopping.set()
                    return
                found = await self.store.get_json(cluster.CLUSTER_KEY)
                if found is not None and found[0].get("enabled"):
                    role = None
                    if self.etcd is not None:
                        role = await own_role(self.config.etcd.endpoints[0], identity=self.identity)
                    beat = cluster.Heartbeat(
                        at=time.time(),
                        voter=bool(role and role.voter),
                        leader=bool(role and role.leader),
                        learner=bool(role and role.learner),
                    )
                    await self.store.put(
                        cluster.heartbeat_key(self.config.member), dump(beat.dump())
                    )
                    await self._voters(leader=beat.leader)
            await asyncio.sleep(cluster.HEARTBEAT_INTERVAL)

    async def _voters(self, *, leader: bool) -> None:
        """This member's part in keeping the store's voters (croft.node.voters)."""
        assert self.store is not None
        if not self._joined:
            self._joined = await voters.confirm_joined(self.store, self.config.member)
        self._beats += 1
        if self._beats % 15 == 1:
            await voters.sync_endpoints(self)
        if leader:
            await voters.lead(self.store)
        elif self.etcd is None and (self._promotion is None or self._promotion.done()):
            request = await voters.request_for(self.store, self.config.member)
            if request is not None:
                # Not in the heartbeat's loop: the learner's catching up takes a while,
                # and this member must stay Online meanwhile.
                self._promotion = asyncio.create_task(
                    self._become_voter(request), name="become-voter"
                )

    async def _become_voter(self, request: Any) -> None:
        try:
            await voters.become_voter(self, request)
        except Exception:
            log.exception("could not become a voter of the store")

    async def _recorded_scale(self) -> dict[str, int]:
        """The replicas `croft scale` recorded for this member (`cluster/scale/<name>`)."""
        assert self.store is not None
        found = await self.store.get_json(cluster.scale_key(self.config.member))
        if found is None:
            return {}
        return {str(k): int(v) for k, v in found[0].items() if k in SERVICES}

    async def _apply_scale(self) -> None:
        """Run as many replicas as recorded for this member, when they differ: `croft
        scale --member` on another member writes the record; this agent follows it."""
        for service, count in (await self._recorded_scale()).items():
            if len(self.children[service]) != count:
                log.info("scaling %s to %d (recorded)", service, count)
                await self.set_replicas(service, count)

    async def _move_scale_record(self, name: str) -> None:
        """The replicas recorded for this member follow it to its new name."""
        assert self.store is not None
        found = await self.store.get_json(cluster.scale_key(self.config.member))
        if found is not None:
            await self.store.put(cluster.scale_key(name), dump(found[0]))
            await self.store.delete(cluster.scale_key(self.config.member))

    def _take_new_name(self, name: str) -> None:
        """`lxc cluster rename` renamed this member: its cluster.yaml overrides croft.yaml's
        `member` from now on, and the agent restarts (`run`) for every service to take it."""
        cluster_join.override_member_name(self.config, name)
        log.info("renamed %s -> %s: restarting under the new name", self.config.member, name)

    async def shutdown_children(self) -> None:
        for service in reversed(SERVICES):
            await asyncio.gather(*(c.stop() for c in self.children[service]))
            self.children[service] = []
        if self.etcd is not None:
            await self.etcd.stop()

    # ------------------------------------------------------------------ gRPC surface

    def _status(self) -> node_pb2.NodeStatusReply:
        return node_pb2.NodeStatusReply(
            member=self.config.member,
            pid=os.getpid(),
            processes=self._process_states(),
            etcd_endpoint=self.config.etcd.endpoints[0] if self.etcd else "",
        )

    async def Status(
        self, request: node_pb2.NodeStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.NodeStatusReply:
        await self.refresh_states()
        return self._status()

    async def Scale(
        self, request: node_pb2.ScaleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.NodeStatusReply:
        assert self.store is not None
        await record_scale(self.store, self.config.member, request.service, request.replicas)
        await self.set_replicas(request.service, request.replicas)
        return self._status()

    async def Shutdown(
        self, request: node_pb2.ShutdownRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.ShutdownReply:
        self.stopping.set()
        return node_pb2.ShutdownReply()


def run(config: Config) -> None:
    telemetry.setup("node", config)
    started = time.monotonic()
    agent = Agent(config)
    asyncio.run(agent.run())
    log.info("node agent stopped after %.1fs", time.monotonic() - started)
    if agent.restart:
        # The same pid, the same log: `croft down` and `croft status` keep finding it.
        os.execv(sys.executable, [sys.executable, "-m", "croft.node"])


def etcd_argv(config: Config, identity: Identity, *extra: str) -> list[str]:
    """The command line of this member's etcd (its data in `<state_dir>/etcd`)."""
    endpoint = config.etcd.endpoints[0]
    url = urlsplit(endpoint)
    peer = f"{url.scheme}://{url.hostname}:{config.etcd.peer_port}"
    tls: list[str] = []
    if url.scheme == "https":
        # Clients and peers alike show a certificate of the member's authority.
        files = [str(identity.cert_path), str(identity.key_path), str(identity.ca_path)]
        tls = [
            "--cert-file", files[0], "--key-file", files[1],
            "--trusted-ca-file", files[2], "--client-cert-auth",
            "--peer-cert-file", files[0], "--peer-key-file", files[1],
            "--peer-trusted-ca-file", files[2], "--peer-client-cert-auth",
        ]  # fmt: skip
    data_dir = config.state_dir / "etcd"
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    etcd = config.etcd
    # One of a cluster's voters (or a learner on its way to be one): the members named
    # by croft init when this member joined. Raft's defaults (100 ms beats, 1 s
    # elections) flap on a busy 2-core host, so a cluster ticks slower.
    clustered = bool(etcd.initial_cluster)
    initial = etcd.initial_cluster or f"{config.member}={peer}"
    timing = ["--heartbeat-interval", "250", "--election-timeout", "2500"] if clustered else []
    return [
        "etcd",
        "--name", config.member,
        "--data-dir", str(data_dir),
        "--listen-client-urls", endpoint,
        "--advertise-client-urls", endpoint,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", initial,
        "--initial-cluster-state", etcd.initial_cluster_state,
        *timing,
        *tls,
        "--auto-compaction-mode", "revision",
        "--auto-compaction-retention", "10000",
        # bbolt's array freelist is scanned on every commit, and compaction
        # leaves the database mostly free pages: the map one is what etcd 3.5
        # defaults to.
        "--experimental-backend-bbolt-freelist-type", "map",
        # Raft entries are kept in memory until a snapshot: 100,000 of them
        # (etcd's default) held ~250 MB after a few hundred launches.
        "--snapshot-count", "10000",
        "--log-level", "warn",
        *extra,
    ]  # fmt: skip


def _max_procs(procs: int) -> dict[str, str]:
    return {"GOMAXPROCS": str(procs)} if procs else {}
