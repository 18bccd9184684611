"""Plain HTTP requests answered without FastAPI's per-request machinery.

Every croft endpoint is `async def handler(request, <path parameters>) -> Response`: it
reads its own query and body, and raises croft errors. FastAPI adds nothing such a
handler needs, yet a request through it crosses seven layers (error middleware,
telemetry, body limit, exception middleware, exit stack, router, endpoint wrapper with
dependency solving): ~0.2 ms of CPU per request, a dozen times per `lxc launch`.

`DirectRoutes` matches a request against the app's routes, in the app's order and with
the routes' own matchers, so the route that answers is the one FastAPI would pick, and
calls the handler itself, with croft's error handling. What it does not take (websockets,
unknown paths, a method a path has no handler for) goes to FastAPI, which answers exactly
as before. croft's own middlewares (tracing, access) run on both ways, once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from croft.api import responses
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
    """The ASGI app that answers plain HTTP routes directly, else hands on to `fallback`."""

    def __init__(self, app: Any, routes: list[Any], fallback: ASGIApp) -> None:
        self.app = app
        self.routes = routes  # the app's own list: routes added later count too
        self.fallback = fallback
        # By id of route (routes are not hashable): how to call it, (route, whether the
        # handler takes the request), or (route, None) for one this class does not call.
        self._how: dict[int, tuple[Any, bool | None]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[FRONTED] = True
        if scope["type"] == "http":
            found = self.match(scope)
            if found is not None:
                route, child = found
                how = self._how.get(id(route))
                if how is None or how[0] is not route:
                    how = self._how[id(route)] = (route, _takes_request(route))
                if how[1] is not None:
                    await self._call(route, how[1], {**scope, **child}, receive, send)
                    return
        await self.fallback(scope, receive, send)

    def match(self, scope: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        """The first route that fully matches the request, as Starlette's router finds it,
        and its child scope."""
        path = scope["path"] if not scope.get("root_path") else ""
        for route in self.routes:
            # A route's path up to its first parameter is a prefix of every path it
            # matches: most routes are ruled out by that, without their regex.
            try:
                literal = route._croft_literal
            except AttributeError:
                literal = route._croft_literal = _literal_prefix(route)
            if not path.startswith(literal):
                continue
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child
        return None

    async def _call(
        self, route: Any, takes_request: bool, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        scope["app"] = self.app
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            if takes_request:
                response = await route.endpoint(request, **scope["path_params"])
            else:
                response = await route.endpoint(**scope["path_params"])
            if not isinstance(response, Response):
                raise TypeError(f"{route.path} returned {type(response).__name__}, not a Response")
        except Exception as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)


def _literal_prefix(route: Any) -> str:
    path = getattr(route, "path", None)
    return path.split("{", 1)[0] if isinstance(path, str) else ""


def _takes_request(route: Any) -> bool | None:
    """For a FastAPI route whose handler is a coroutine taking nothing but the request
    and path parameters (every croft endpoint): whether it takes the request. None for
    any other route, which goes through FastAPI."""
    if not isinstance(route, APIRoute) or not inspect.iscoroutinefunction(route.endpoint):
        return None
    names = set(inspect.signature(route.endpoint).parameters)
    if names - {"request"} != set(route.param_convertors):
        return None
    return "request" in names
