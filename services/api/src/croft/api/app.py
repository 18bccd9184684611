"""The `/1.0` REST application: `create_app(store)` builds it; serving is `serving.py`.

Endpoint modules (`routes/*.py`) reach the shared parts through `croft.api.context`;
this module only puts them together and orders the routes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from croft.api.auth import AccessMiddleware
from croft.api.context import ApiContext, ApiSettings
from croft.api.direct import FRONTED, DirectRoutes, error_response
from croft.api.events import EventHub
from croft.api.operations import OperationManager
from croft.api.records import DEFAULT_PROJECT, RECORDS, project_key, record_key
from croft.api.routes import (
    authorization,
    certificates,
    events,
    image_export,
    image_secrets,
    images,
    instance,
    instance_backups,
    instance_console,
    instance_exec,
    instance_files,
    instance_logs,
    instance_snapshots,
    instance_state,
    instances,
    network_acls,
    network_changes,
    network_forwards,
    networks,
    profiles,
    projects,
    server,
    storage_pools,
    storage_volume_backups,
    storage_volumes,
    streams,
)
from croft.api.routes import cluster as cluster_routes
from croft.api.routes import operations as operation_routes
from croft.api.tracing import TracingMiddleware
from croft.common.errors import Conflict, CroftError
from croft.common.events import publisher as shared_publisher
from croft.common.store import Store
from croft.common.store.mirror import MirroredStore

log = logging.getLogger(__name__)


DEFAULT_PROJECT_RECORD: dict[str, Any] = {
    "name": DEFAULT_PROJECT,
    "description": "Default LXD project",
    "config": {
        "features.images": "true",
        "features.networks": "true",
        "features.profiles": "true",
        "features.storage.volumes": "true",
    },
}


def default_profile_record(settings: ApiSettings) -> dict[str, Any]:
    return {
        "name": "default",
        "description": "Default LXD profile",
        "config": {},
        "devices": {
            "root": {"type": "disk", "path": "/", "pool": settings.default_pool},
            "eth0": {"type": "nic", "name": "eth0", "network": settings.default_network},
        },
    }


async def bootstrap(store: Store, settings: ApiSettings) -> None:
    """Records every croft starts with: the default project and its default profile.
    Safe to run on every start of every replica (creation is atomic, first one wins)."""
    with contextlib.suppress(Conflict):
        await store.create_json(project_key(DEFAULT_PROJECT), DEFAULT_PROJECT_RECORD)
    with contextlib.suppress(Conflict):
        await store.create_json(
            record_key("profiles", DEFAULT_PROJECT, "default"), default_profile_record(settings)
        )


def create_app(store: Store, settings: ApiSettings | None = None) -> FastAPI:
    """The REST application of one api replica on `store`. Its lifespan creates the
    default records, starts the operation manager and follows the event log; serve it
    with `croft.api.serving.serve_unix` (or any ASGI server that runs lifespans)."""
    settings = settings or ApiSettings()
    # Records are read from a watched copy: see croft.common.store.mirror.
    publisher = shared_publisher(store)
    mirror = MirroredStore(store, (RECORDS,))
    store = mirror
    operations = OperationManager(
        store,
        location=settings.location,
        lease_ttl=settings.operation_lease_ttl,
        keep_finished=settings.keep_finished_operations,
        events=publisher,
    )
    if settings.owner_id:
        operations.owner_id = settings.owner_id
    hub = EventHub(store)
    ctx = ApiContext(store, settings, operations, hub, publisher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bootstrap(store, settings)
        await mirror.start()
        await hub.start()
        await operations.start()
        await ctx.authorizer.start()
        try:
            yield
        finally:
            await ctx.authorizer.close()
            await operations.close()
            await hub.close()
            await mirror.close()

    app = CroftApp(
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
        # TracingMiddleware makes the one server span per request; FastAPI's own would
        # be a second one, and its metrics cost as much again on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.croft = ctx
    app.add_middleware(AccessMiddleware)
    app.add_middleware(TracingMiddleware)  # outermost: refused requests are traced too
    app.router.redirect_slashes = False
    _install_error_handlers(app)

    for module in route_modules():
        # The routes themselves, not the routers: FastAPI matches an included router's
        # routes through a per-router wrapper that costs ~0.2 ms per request.
        app.router.routes.extend(module.router.routes)
    app.router.routes[:] = busiest_first(app.router.routes, HOT_PATHS)
    app.direct = DirectRoutes(app, app.router.routes, fallback=app.through_fastapi)
    app.front = TracingMiddleware(AccessMiddleware(app.direct))
    return app


class CroftApp(FastAPI):
    """FastAPI, in front of which requests take a shorter way (`front`, croft.api.direct);
    lifespan events go through FastAPI as usual."""

    direct: DirectRoutes | None = None
    front: Any = None  # croft's middlewares around `direct`; None: all through FastAPI

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.front is not None and scope["type"] != "lifespan" and FRONTED not in scope:
            scope["app"] = self  # as Starlette does: the middlewares may look at it
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def through_fastapi(self, scope: Any, receive: Any, send: Any) -> None:
        await super().__call__(scope, receive, send)


def route_modules() -> tuple[Any, ...]:
    """The route modules, in the order their routes are matched (before busiest_first):
    no two serve overlapping paths, except image_secrets, which stays before images. The
    instance modules keep the order their routes had when they were one module."""
    return (
        instances,
        instance,
        instance_state,
        instance_exec,
        instance_files,
        instance_logs,
        instance_console,
        instance_backups,
        instance_snapshots,
        operation_routes,
        events,
        server,
        image_secrets,
        projects,
        profiles,
        images,
        storage_pools,
        storage_volume_backups,
        storage_volumes,
        networks,
        network_changes,
        network_acls,
        network_forwards,
        image_export,
        certificates,
        authorization,
        cluster_routes,
        streams,
    )


# What the `lxc` client and lxd-benchmark (which uses the /1.0/containers names) ask for
# in a launch, an exec, a list.
HOT_PATHS = (
    "/1.0/instances/{name}/state",
    "/1.0/instances/{name}",
    "/1.0/instances",
    "/1.0/containers/{name}/state",
    "/1.0/containers",
    "/1.0/operations/{op_id}",
    "/1.0/instances/{name}/exec",
    "/1.0/operations/{op_id}/websocket",
    "/1.0/events",
    "/1.0",
    "/1.0/images/aliases",
    "/1.0/images/{fingerprint}",
)


def _segments(path: str) -> list[str | None]:
    """A route path's segments, None for a parameter ([^/]+); a `:path` parameter (any
    number of segments) is returned as a single "*"."""
    out: list[str | None] = []
    for part in path.strip("/").split("/"):
        if part.startswith("{") and part.endswith("}"):
            out.append("*" if part.endswith(":path}") else None)
        else:
            out.append(part)
    return out


def _may_overlap(a: str, b: str) -> bool:
    """Whether some request path could match both route paths."""
    sa, sb = _segments(a), _segments(b)
    ka = sa.index("*") if "*" in sa else None
    kb = sb.index("*") if "*" in sb else None
    if ka is None and kb is None:
        if len(sa) != len(sb):
            return False
        n = len(sa)
    elif ka is not None and kb is not None:
        n = min(ka, kb)
    else:
        # One ends in a `:path` parameter at segment k: the other needs segment k too.
        k, plain = (ka, sb) if ka is not None else (kb, sa)
        assert k is not None
        if len(plain) < k + 1:
            return False
        n = k
    return all(x is None or y is None or x == y for x, y in zip(sa[:n], sb[:n], strict=True))


def busiest_first(routes: list[Any], hot: tuple[str, ...]) -> list[Any]:
    """The routes with those at `hot` paths moved to the front, in `hot`'s order; the
    rest keep theirs. Matching stops at the first route that fits, so a route may only
    jump over routes no request path could also match: anything else is refused here,
    at start-up, rather than changing which handler answers."""
    rank = {path: i for i, path in enumerate(hot)}
    moved = sorted(
        (r for r in routes if getattr(r, "path", None) in rank), key=lambda r: rank[r.path]
    )
    reordered = moved + [r for r in routes if r not in moved]
    position = {id(r): i for i, r in enumerate(routes)}
    for i, route in enumerate(reordered):
        for other in reordered[i + 1 :]:
            if position[id(other)] > position[id(route)]:
                continue  # the original order
            mine, theirs = getattr(route, "methods", None), getattr(other, "methods", None)
            same_methods = mine is None or theirs is None or bool(mine & theirs)
            if same_methods and _may_overlap(route.path, other.path):
                raise RuntimeError(f"route {route.path} cannot go before {other.path}")
    return reordered


def _install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    app.add_exception_handler(CroftError, handle)
    app.add_exception_handler(StarletteHTTPException, handle)
    app.add_exception_handler(Exception, handle)
