"""The life of a croft service process, the same for all seven.

`main("images", setup)` loads the configuration, sets up telemetry, connects to the
store, lets `setup` add the service's gRPC servicers, serves, registers in discovery,
and on SIGTERM/SIGINT drains (NOT_SERVING, deregister, finish in-flight calls) and exits 0.
A configuration error exits 2 with the message on stderr, before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from croft.common import discovery, internal_tls, proc, telemetry
from croft.common.config import Config, ConfigError, load_config
from croft.common.errors import CroftError, Unavailable
from croft.common.rpc import VERSION, Server, ServiceClient
from croft.common.store import Store, connect

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """What a service's setup gets: its configuration, the store and its gRPC server."""

    name: str
    config: Config
    store: Store
    server: Server
    instance_id: str
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What the service tells callers in its registration besides its version (e.g. the
    # instance types a compute service runs); set by its setup.
    registration_metadata: dict[str, str] = field(default_factory=dict)
    _clients: dict[tuple[str, str | None], ServiceClient[Any]] = field(default_factory=dict)

    async def client(
        self, service: str, stub_factory: Callable[[Any], Any], member: str | None = None
    ) -> ServiceClient[Any]:
        """A shared, discovery-balanced client of another service."""
        key = (service, member)
        if key not in self._clients:
            client = ServiceClient(
                self.store, service, stub_factory, member=member, timeout=self.config.rpc.timeout
            )
            self._clients[key] = await client.start()
        return self._clients[key]

    def background(self, *work: tuple[str, Coroutine[Any, Any, None]]) -> None:
        """Run each (name, coroutine) as a task for the life of the service: cancelled,
        and waited for, when it stops."""
        tasks = [asyncio.create_task(coro, name=name) for name, coro in work]

        async def stop() -> None:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        self.shutdown_hooks.append(stop)


Setup = Callable[[ServiceContext], Awaitable[None]]


def internal_identity(config: Config) -> internal_tls.Identity | None:
    """The member's internal certificate when its etcd is reached over https: one switch
    for etcd's and the services' TLS (a plain `http://` etcd, as in-process tests run
    one, leaves gRPC plain too)."""
    if any(e.startswith("https://") for e in config.etcd.endpoints):
        return internal_tls.load(config.state_dir)
    return None


async def connect_store(config: Config, wait: float = 30.0) -> Store:
    """Connect to the store, waiting up to `wait` seconds for etcd to come up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.1
    while True:
        try:
            return await connect(config.etcd.endpoints, internal_identity(config))
        except Unavailable:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def run(name: str, setup: Setup | None = None, config: Config | None = None) -> None:
    config = config or load_config()
    proc.watch_children_with_pidfds()
    telemetry.setup(name, config)
    instance_id = os.environ.get("CROFT_INSTANCE_ID") or discovery.new_instance_id()
    store = await connect_store(config)
    server = Server(name, config.member, instance_id, host=config.rpc.host, identity=store.identity)
    context = ServiceContext(name, config, store, server, instance_id)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    registration = None
    try:
        if setup is not None:
            await setup(context)
        address = await server.start()
        registration = await discovery.register(
            store,
            name,
            config.member,
            address,
            {**context.registration_metadata, "version": VERSION},
            ttl=config.registry.lease_ttl,
            instance_id=instance_id,
        )
        log.info("%s %s serving on %s", name, instance_id, address)
        await stopping.wait()
        log.info("%s %s stopping", name, instance_id)
        await server.stop(grace=10.0, before_drain=registration.deregister)
    finally:
        if registration is not None:
            await registration.deregister()
        for hook in reversed(context.shutdown_hooks):
            with contextlib.suppress(Exception):
                await hook()
        for client in context._clients.values():
            await client.close()
        await store.close()


def main(name: str, setup: Setup | None = None) -> None:
    """Entry point of `python -m croft.<name>` and `croft-<name>`."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"croft-{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(run(name, setup, config))
    except CroftError as exc:
        print(f"croft-{name}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
