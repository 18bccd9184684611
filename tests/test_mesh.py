"""The foundation as a user meets it: `croft up`, `status`, `scale`, `down`, and the mesh
surviving services that die."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from croft.common import discovery, internal_tls, rpc
from croft.common.errors import Unavailable
from croft.common.store.etcd import EtcdStore
from croft.common.telemetry import current_trace_id
from croft.common.testing.waiting import wait_until
from croft.v1 import common_pb2, common_pb2_grpc

from .conftest import Croft, make_croft

SERVICES = {"api", "auth", "compute", "storage", "network", "images"}


def serving(croft: Croft) -> list[dict]:
    return [r for r in croft.status() if r["health"] == "SERVING"]


def test_up_shows_six_healthy_services_and_etcd(running_croft: Croft) -> None:
    rows = running_croft.status()
    assert {r["service"] for r in rows} == SERVICES | {"etcd"}
    assert all(r["health"] == "SERVING" for r in rows), rows
    assert all(r["uptime"] is not None for r in rows if r["service"] != "etcd")
    table = running_croft.run("status").stdout
    for name in SERVICES:
        assert name in table
    # etcd runs on one Go P by default (etcd.max_procs): see start_etcd.
    data_dir = str(running_croft.root / "state" / "etcd").encode()
    (etcd,) = [
        pid
        for pid in running_croft.processes()
        if data_dir in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert b"GOMAXPROCS=1" in Path(f"/proc/{etcd}/environ").read_bytes().split(b"\0")


def test_up_twice_is_harmless(running_croft: Croft) -> None:
    before = {r["id"]: r["pid"] for r in running_croft.status()}
    running_croft.run("up")
    after = {r["id"]: r["pid"] for r in running_croft.status()}
    assert after == before


def test_killed_service_is_restarted_and_re_registers(running_croft: Croft) -> None:
    (old,) = [r for r in running_croft.status() if r["service"] == "storage"]
    os.kill(old["pid"], signal.SIGKILL)

    def restarted() -> list[dict]:
        return [
            r
            for r in serving(running_croft)
            if r["service"] == "storage" and r["pid"] != old["pid"]
        ]

    (new,) = wait_until(restarted, 30, "storage to come back")
    assert new["id"] != old["id"]
    # The dead instance's entry goes with its lease (TTL 2 s in these tests).
    wait_until(
        lambda: all(r["id"] != old["id"] for r in running_croft.status()),
        2 + 3,
        "the dead instance's registration to expire",
    )


async def test_a_stale_registration_disappears_within_its_ttl(running_croft: Croft) -> None:
    store = await running_croft.connect()
    try:
        ttl = 2
        registration = await discovery.register(store, "ghost", "testnode", "127.0.0.1:1", ttl=ttl)
        assert [i.id for i in await discovery.resolve(store, "ghost")] == [registration.instance.id]
        # Stop refreshing without deregistering: what a SIGKILLed process leaves behind.
        assert registration._task is not None
        registration._task.cancel()
        started = time.monotonic()
        while await discovery.resolve(store, "ghost"):
            assert time.monotonic() - started < ttl + 2, "stale registration outlived its TTL"
            await asyncio.sleep(0.1)
    finally:
        await store.close()


async def test_no_inside_port_answers_a_client_without_the_members_certificate(
    running_croft: Croft, tmp_path: Path
) -> None:
    """Every service's gRPC port and etcd's client port ask for a certificate of the
    member's internal authority: a local user without it (no certificate, or one of
    another authority) gets nothing; plain gRPC/HTTP get nothing either."""
    ours = running_croft.identity
    assert ours is not None
    stranger = internal_tls.ensure(tmp_path / "stranger")
    store = await running_croft.connect()
    try:
        instances = await discovery.resolve(store, None)
    finally:
        await store.close()
    assert {i.service for i in instances} >= SERVICES
    for instance in instances:
        assert await rpc.health_of(instance.address, identity=ours) == "SERVING", instance
        for identity in (None, stranger):
            assert await rpc.health_of(instance.address, identity=identity) == "UNREACHABLE", (
                instance,
                identity,
            )
    port = urlsplit(running_croft.endpoint).port
    for endpoint, identity in (
        (f"http://127.0.0.1:{port}", None),
        (f"https://127.0.0.1:{port}", None),
        (f"https://127.0.0.1:{port}", stranger),
    ):
        with pytest.raises(Unavailable):
            await EtcdStore([endpoint], timeout=2, identity=identity).start()
    assert (ours.directory.stat().st_mode & 0o777) == 0o700
    assert (ours.key_path.stat().st_mode & 0o777) == 0o600


async def test_trace_id_follows_a_call_into_a_service(running_croft: Croft) -> None:
    from opentelemetry import trace

    from croft.common import telemetry
    from croft.common.config import load_config

    telemetry.setup("test", load_config(running_croft.config_file))
    store = await running_croft.connect()
    client = await rpc.ServiceClient(store, "auth", common_pb2_grpc.ServiceStub).start()
    try:
        with trace.get_tracer("test").start_as_current_span("caller"):
            mine = current_trace_id()
            reply = await client.call("Status", common_pb2.StatusRequest())
        assert mine and reply.trace_id == mine
        assert reply.service == "auth"
    finally:
        await client.close()
        await store.close()


async def test_calls_survive_a_replica_killed_mid_flight(running_croft: Croft) -> None:
    running_croft.run("scale", "images=2")
    store = await running_croft.connect()
    client = await rpc.ServiceClient(store, "images", common_pb2_grpc.ServiceStub).start()
    try:
        replicas = await client._watcher.wait_for(lambda xs: len(xs) == 2, 30)
        victim = replicas[0]
        answered_by: dict[str, int] = {}

        async def one(n: int) -> None:
            await asyncio.sleep(n * 0.002)  # spread over ~0.4 s so the kill lands mid-flight
            reply = await client.call("Status", common_pb2.StatusRequest(), timeout=20)
            answered_by[reply.instance_id] = answered_by.get(reply.instance_id, 0) + 1

        async def kill_soon() -> None:
            await asyncio.sleep(0.15)
            os.kill(victim.pid, signal.SIGKILL)

        results = await asyncio.gather(
            *(one(n) for n in range(200)), kill_soon(), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        assert sum(answered_by.values()) == 200
        # Calls were spread over both replicas before the kill.
        assert len(answered_by) >= 2
    finally:
        await client.close()
        await store.close()
        running_croft.run("scale", "images=1")


def test_per_host_services_cannot_be_scaled(running_croft: Croft) -> None:
    result = running_croft.run("scale", "compute=2", check=False)
    assert result.returncode == 1
    assert "compute runs exactly once per host" in result.stderr


def test_down_leaves_no_process(croft_dir) -> None:  # type: ignore[no-untyped-def]
    croft = make_croft(croft_dir)
    croft.run("up")
    # The moment `up` returns, LXD's API answers on the socket (no service still starting).
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(croft.root / "state" / "unix.socket"))
        client.sendall(b"GET /1.0 HTTP/1.1\r\nHost: croft\r\nConnection: close\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.1 200")
    assert len(croft.processes()) >= 8  # agent, etcd, six services
    croft.run("down")
    assert croft.processes() == []
    assert croft.run("down").stdout.strip() == "croft is not running"


def test_a_sigkilled_node_agent_takes_its_services_and_etcd_with_it(croft_dir) -> None:  # type: ignore[no-untyped-def]
    """A new agent would start second copies of whatever outlived the old one: every
    child of the agent has the parent-death signal set before it runs."""
    croft = make_croft(croft_dir)
    croft.run("up")
    try:
        (agent,) = [
            pid
            for pid in croft.processes()
            if b"croft.node" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"croft.client" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(croft.processes()) >= 8  # agent, etcd, six services
        os.kill(agent, signal.SIGKILL)
        wait_until(lambda: croft.processes() == [], 30, "the agent's children to go")
    finally:
        croft.run("down", check=False)
