"""Requests answered without FastAPI's per-request machinery.

Every croft endpoint is `async def handler(request, <path parameters>) -> Response`: it
reads its own query and body, and raises croft errors. FastAPI adds nothing such a
handler needs, yet a request through it crosses seven layers (error middleware,
telemetry, body limit, exception middleware, exit stack, router, endpoint wrapper with
dependency solving): ~0.2 ms of CPU per request, a dozen times per `lxc launch`.

`DirectRoutes` matches a request against the app's routes, in the app's order and with
the routes' own matchers, so the route that answers is the one FastAPI would pick, and
calls the handler itself, with croft's error handling. Websockets go the same way: an
event sent to a `/1.0/events` listener then crosses no FastAPI layer either. What it does
not take (unknown paths, a method a path has no handler for) goes to FastAPI, which
answers exactly as before. croft's own middlewares (tracing, access) run on both ways,
once.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.websockets import WebSocket

from croft.api import query, responses
from croft.common.errors import CroftError, Internal, NotFound, NotImplementedYet

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

# Set in a scope once croft's middlewares have run on it, so that a request handed on
# to FastAPI does not go through them twice.
FRONTED = "croft.fronted"


def error_response(request: Request, exc: Exception) -> Response:
    """What a handler's exception becomes: LXD's error envelope (FastAPI's way uses the
    same function)."""
    if isinstance(exc, CroftError):
        if exc.http_status < 500:
            # The client's mistake, answered in full: not croft's error to log loudly.
            log.debug("refused %s %s: %s", request.method, request.url.path, exc.message)
        return responses.error(exc)
    if isinstance(exc, HTTPException):
        # LXD answers an unknown path "not found", and a known path with a method it has
        # no handler for "501 not implemented".
        if exc.status_code == 404:
            return responses.error(NotFound("not found"))
        if exc.status_code == 405:
            return responses.error(NotImplementedYet("not implemented"))
        err = CroftError(str(exc.detail))
        err.http_status = exc.status_code
        return responses.error(err)
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return responses.error(Internal(f"{type(exc).__name__}: {exc}"))


class DirectRoutes:
    """The ASGI app that calls croft's handlers directly, else hands on to `fallback`."""

    def __init__(self, app: Any, routes: list[Any], fallback: ASGIApp) -> None:
        self.app = app
        self.routes = routes  # the app's own list: routes added later count too
        self.fallback = fallback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[FRONTED] = True
        if scope["type"] in ("http", "websocket"):
            found = self.match(scope)
            if found is not None:
                route, child = found
                call = _cached(route, "_croft_call", call_of)
                if call is not None:
                    scope = {**scope, **child, "app": self.app, "route": route}
                    await call(route, scope, receive, send)
                    return
        await self.fallback(scope, receive, send)

    def match(self, scope: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        """The first route that fully matches the request, as Starlette's router finds it,
        and its child scope."""
        path = scope["path"] if not scope.get("root_path") else ""
        for route in self.routes:
            # A route's path up to its first parameter is a prefix of every path it
            # matches: most routes are ruled out by that, without their regex.
            if not path.startswith(_cached(route, "_croft_literal", _literal_prefix)):
                continue
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child
        return None


Call = Callable[[Any, dict[str, Any], Any, Any], Awaitable[None]]


async def _http(
    route: Any, scope: dict[str, Any], receive: Any, send: Any, *, with_request: bool = True
) -> None:
    request = Request(scope, receive, send)
    try:
        query.check_path_names(route.path, scope["path_params"])
        query.check_query(request)
        args = (request,) if with_request else ()
        response = await route.endpoint(*args, **scope["path_params"])
        if not isinstance(response, Response):
            raise TypeError(f"{route.path} returned {type(response).__name__}, not a Response")
    except Exception as exc:
        response = error_response(request, exc)
    await response(scope, receive, send)


async def _websocket(route: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    # croft's websocket handlers turn their own errors into a close or a refusal; what
    # else escapes is a bug, which uvicorn logs and answers (500, or close 1011), as it
    # does when FastAPI lets it through.
    await route.endpoint(WebSocket(scope, receive, send), **scope["path_params"])


def call_of(route: Any) -> Call | None:
    """How to call a route's handler that is a coroutine taking nothing but the request
    (or websocket) and the path parameters, as every croft endpoint does; None for any
    other route, which goes through FastAPI."""
    if not isinstance(route, APIRoute | APIWebSocketRoute) or not inspect.iscoroutinefunction(
        route.endpoint
    ):
        return None
    names = set(inspect.signature(route.endpoint).parameters)
    first = "websocket" if isinstance(route, APIWebSocketRoute) else "request"
    if names - {first} != set(route.param_convertors):
        return None
    if first == "websocket":
        return _websocket if first in names else None
    return _http if first in names else functools.partial(_http, with_request=False)


def _cached(route: Any, attribute: str, compute: Callable[[Any], Any]) -> Any:
    """What `compute` says of a route, worked out once and kept on the route itself."""
    try:
        return getattr(route, attribute)
    except AttributeError:
        value = compute(route)
        setattr(route, attribute, value)
        return value


def _literal_prefix(route: Any) -> str:
    path = getattr(route, "path", None)
    return path.split("{", 1)[0] if isinstance(path, str) else ""
