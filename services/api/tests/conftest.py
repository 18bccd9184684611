"""Fixtures: a real etcd, and api replicas serving the REST API on temporary unix sockets.

Each replica runs in its own thread with its own event loop and its own store connection,
so the tests can drive it with blocking clients (the `lxc` binary, pylxd, http.client)
the way a person would, and two replicas are as separate as two processes on one store.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI

from croft.api.app import create_app
from croft.api.context import ApiContext, ApiSettings
from croft.api.serving import UnixServer, serve_unix
from croft.common.store import Store, connect
from croft.common.testing.etcd import EtcdServer
from croft.common.testing.waiting import UnixHTTPConnection

TEMP_PREFIX = "croft-api-test-"
T = TypeVar("T")

TEST_SETTINGS = ApiSettings(
    server_name="croft-test",
    operation_lease_ttl=2,  # a dead owner's operations fail about 2 s after it dies
    keep_finished_operations=5.0,
)


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = body
        self.json: Any = json.loads(body) if body.strip() else None

    @property
    def metadata(self) -> Any:
        return self.json["metadata"]

    @property
    def error(self) -> str:
        return str(self.json["error"])

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.raw[:300]!r})"


class Replica:
    """One api replica: a thread running an event loop, a store connection, the app
    served on `<dir>/unix.socket` (so `LXD_DIR=<dir>` points `lxc` and pylxd at it)."""

    def __init__(
        self,
        endpoints: list[str],
        settings: ApiSettings,
        customize: Callable[[FastAPI], None] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.customize = customize
        self.dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        self.home = self.dir / "home"
        self.home.mkdir()
        self.socket = self.dir / "unix.socket"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.store: Store | None = None
        self.app: FastAPI | None = None
        self.server: UnixServer | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on this replica's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> Replica:
        self.thread.start()

        async def up() -> None:
            self.store = await connect(self.endpoints)
            self.app = create_app(self.store, self.settings)
            if self.customize is not None:
                self.customize(self.app)
            self.server = await serve_unix(self.app, self.socket)

        self.run(up())
        return self

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def down() -> None:
            if self.server is not None:
                await self.server.stop()
            if self.store is not None:
                await self.store.close()

        try:
            self.run(down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def ctx(self) -> ApiContext:
        assert self.app is not None
        ctx: ApiContext = self.app.state.croft
        return ctx

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LXD_DIR": str(self.dir), "HOME": str(self.home)}

    def lxc(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `lxc` client against this replica."""
        result = subprocess.run(
            ["lxc", *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"lxc {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = 60.0,
    ) -> Reply:
        connection = UnixHTTPConnection(str(self.socket), timeout=timeout)
        try:
            payload = raw if raw is not None else (None if body is None else json.dumps(body))
            connection.request(method, path, body=payload, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(prefix=f"{TEMP_PREFIX}etcd-") as server:
        yield server


@pytest.fixture
def clean_store(etcd: EtcdServer) -> EtcdServer:
    """Every test starts from an empty croft keyspace."""

    async def wipe() -> None:
        store = await connect(etcd.endpoints)
        try:
            await store.delete_prefix("/croft/")
        finally:
            await store.close()

    asyncio.run(wipe())
    return etcd


@pytest.fixture
def replica(clean_store: EtcdServer) -> Iterator[Replica]:
    r = Replica(clean_store.endpoints, TEST_SETTINGS).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def second_replica(replica: Replica, clean_store: EtcdServer) -> Iterator[Replica]:
    """Another replica on the same store (a different process in production)."""
    r = Replica(clean_store.endpoints, replace(TEST_SETTINGS, server_name="croft-test-2")).start()
    try:
        yield r
    finally:
        r.stop()
