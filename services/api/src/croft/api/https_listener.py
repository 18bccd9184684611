"""`core.https_address`, applied: the HTTPS listener of one api replica.

The server config record in the store is the source of truth, as LXD's database is:
every replica follows it (`HttpsListener.follow`) and opens, moves or closes its listener
when the key changes, and at start. Replicas of one member share the port
(SO_REUSEPORT). The replica that takes a `PUT`/`PATCH /1.0` changing the key moves its
own listener first, so that an address it cannot listen on is refused (400) and nothing
is stored, as LXD refuses it.

`api.https_address` in croft.yaml is only the initial value: the first start that sees it
writes it to the server config, once (`seed_https_address`); from then on `lxc config
set/unset core.https_address` rules, across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

from croft.api import records
from croft.api.config_keys import validate_server_config
from croft.api.context import context
from croft.api.serving import HttpsServer
from croft.api.tls import ServerCertificate
from croft.common import cluster
from croft.common.errors import CroftError, InvalidArgument
from croft.common.store import Store
from croft.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

HTTPS_ADDRESS = "core.https_address"
# In the server config record, beside "config": croft.yaml's address was written once.
_SEEDED = "https_address_seeded"


class HttpsListener:
    """Serves `app` over HTTPS on whatever address `apply` was last given ("" = none).

    `run_lifespan`: run the app's lifespan while listening (a replica with no unix
    server beside it to run it)."""

    def __init__(
        self,
        app: FastAPI,
        certificate: ServerCertificate,
        *,
        run_lifespan: bool = False,
        member: str = "",
    ) -> None:
        self.app = app
        self.member = member
        self.certificate = certificate
        self.run_lifespan = run_lifespan
        self.address = ""
        self._server: HttpsServer | None = None
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._lock = asyncio.Lock()
        self._followers: list[asyncio.Task[None]] = []

    @property
    def _followed(self) -> tuple[str, ...]:
        member = (cluster.member_key(self.member),) if self.member else ()
        return (records.SERVER_CONFIG_KEY, *member)

    def install(self) -> None:
        """Make this the listener that `PUT /1.0` moves (`https_address_change`)."""
        self.app.state.https_listener = self

    async def apply(self, address: str) -> None:
        """Listen on `address`, or on nothing for "". The new listener is up before the
        old one closes; InvalidArgument when it cannot be, and the old one stays."""
        async with self._lock:
            if address == self.address:
                return
            new: HttpsServer | None = None
            if address:
                validate_server_config({HTTPS_ADDRESS: address})
                if self.run_lifespan and self._lifespan is None:
                    lifespan = self.app.router.lifespan_context(self.app)
                    await lifespan.__aenter__()
                    self._lifespan = lifespan
                new = HttpsServer(self.app, address, self.certificate, reuse_port=True)
                try:
                    await new.start()
                except (OSError, ValueError) as exc:
                    if self._server is None:
                        await self._close_lifespan()
                    raise InvalidArgument(f"Failed to listen on {address}: {exc}") from None
            old, self._server, self.address = self._server, new, address
            if old is not None:
                await old.stop()
            if new is None:
                await self._close_lifespan()
            log.info("HTTPS %s", f"on {address}" if address else "closed")

    async def _close_lifespan(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)

    async def follow(self, store: Store) -> None:
        """Apply the stored core.https_address now, then start following its changes."""
        revision = await store.revision()
        await self._apply_stored(store)
        self._followers = [
            asyncio.create_task(self._follow(store, key, revision + 1)) for key in self._followed
        ]

    async def _apply_stored(self, store: Store) -> None:
        # A cluster member's core.https_address is its own (LXD's member-local key), in
        # its member record; a standalone server's is in the server config.
        member = await store.get_json(cluster.member_key(self.member)) if self.member else None
        if member is not None:
            address = member[0].get("https_address") or member[0].get("address", "")
        else:
            found = await store.get_json(records.SERVER_CONFIG_KEY)
            address = (found[0].get("config", {}) if found else {}).get(HTTPS_ADDRESS, "")
        try:
            await self.apply(address)
        except CroftError as exc:
            log.warning("cannot apply %s: %s", HTTPS_ADDRESS, exc.message)

    async def _follow(self, store: Store, key: str, revision: int) -> None:
        while True:
            try:
                async for event in store.watch(key, start_revision=revision):
                    revision = event.revision + 1
                    if event.key != key:
                        continue
                    await self._apply_stored(store)
            except CroftError as exc:
                log.warning("following the server config broke (%s); resuming", exc)
                await asyncio.sleep(0.5)
                # What changed meanwhile may be compacted away: read it afresh.
                revision = await _revision_or(store, revision)
                await self._apply_stored(store)

    async def stop(self) -> None:
        for follower in self._followers:
            await cancel_and_wait(follower)
        self._followers = []
        async with self._lock:
            if self._server is not None:
                await self._server.stop()
            self._server, self.address = None, ""
            await self._close_lifespan()


async def _revision_or(store: Store, fallback: int) -> int:
    try:
        return await store.revision() + 1
    except CroftError:
        return fallback


async def seed_https_address(store: Store, address: str) -> None:
    """Write croft.yaml's `api.https_address` to the server config as core.https_address,
    the first time a start sees the record without it; never again after (so an unset
    survives restarts)."""

    found = await store.get_json(records.SERVER_CONFIG_KEY)
    if found is not None and found[0].get(_SEEDED):
        return

    def seed(record: dict[str, Any]) -> dict[str, Any]:
        if record.get(_SEEDED):
            return record
        config = dict(record.get("config") or {})
        if address and HTTPS_ADDRESS not in config:
            config[HTTPS_ADDRESS] = address
        return {**record, "config": config, _SEEDED: True}

    await records.modify(store, records.SERVER_CONFIG_KEY, seed, missing="", default={"config": {}})


def serving_address(request: Request) -> str:
    """Where this replica serves HTTPS now ("" = nowhere)."""
    listener: HttpsListener | None = getattr(request.app.state, "https_listener", None)
    if listener is not None:
        return listener.address
    return context(request).settings.https_address


@contextlib.asynccontextmanager
async def https_address_change(
    request: Request, wanted: Mapping[str, object], *, patch: bool
) -> AsyncIterator[None]:
    """Around the write of a server config change: this replica's listener moves to the
    new core.https_address first (InvalidArgument if it cannot, nothing written), and
    back if the write fails."""
    listener: HttpsListener | None = getattr(request.app.state, "https_listener", None)
    if listener is None or (patch and HTTPS_ADDRESS not in wanted):
        yield
        return
    new = wanted.get(HTTPS_ADDRESS, "")
    before = listener.address
    if not isinstance(new, str) or new == before:
        yield
        return
    await listener.apply(new)
    try:
        yield
    except BaseException:
        with contextlib.suppress(CroftError):
            await listener.apply(before)
        raise
