"""Plain HTTP requests skip FastAPI's layers (croft.api.direct), and are answered exactly
as FastAPI would answer them."""

from __future__ import annotations

from typing import Any

from starlette.routing import Match

from croft.api import app as app_module
from croft.api.direct import DirectRoutes, call_of

from .conftest import Replica
from .test_routing import first_match, fitting, unique_paths

# Reads, refused writes (which change nothing), unknown paths and methods.
REQUESTS: list[tuple[str, str, Any]] = [
    ("GET", "/1.0", None),
    ("GET", "/1.0/instances", None),
    ("GET", "/1.0/instances?recursion=1", None),
    ("GET", "/1.0/instances/missing", None),
    ("GET", "/1.0/instances/missing/state", None),
    ("POST", "/1.0/instances", {"name": "-bad", "source": {"type": "none"}}),
    ("POST", "/1.0/instances", "not an object"),
    ("PUT", "/1.0/instances/missing/state", {"action": "start"}),
    ("GET", "/1.0/profiles", None),
    ("GET", "/1.0/profiles/default", None),
    ("POST", "/1.0/profiles", {"name": "default"}),
    ("PATCH", "/1.0", {"config": {"no.such.key": "1"}}),
    ("GET", "/1.0/images/aliases/missing", None),
    ("GET", "/1.0/images/0123", None),
    ("GET", "/1.0/operations", None),
    ("GET", "/1.0/operations/00000000-0000-0000-0000-000000000000", None),
    ("GET", "/1.0/events", None),  # not a websocket upgrade
    ("GET", "/1.0/projects/nope/state", None),
    ("GET", "/2.0/nothing", None),  # no such path
    ("DELETE", "/1.0", None),  # no such method for the path
    ("GET", "/", None),
]


def answers(replica: Replica) -> list[tuple[int, Any]]:
    out = []
    for method, path, body in REQUESTS:
        reply = replica.request(method, path, body)
        out.append((reply.status, reply.json))
    return out


def test_the_route_found_is_the_one_starlette_finds() -> None:
    routes = app_module.busiest_first(
        [r for m in app_module.route_modules() for r in m.router.routes], app_module.HOT_PATHS
    )
    direct = DirectRoutes(None, routes, fallback=None)  # type: ignore[arg-type]
    checked = 0
    for path in unique_paths(routes):
        candidates = fitting(routes, path)
        for method in ("GET", "PUT", "PATCH", "POST", "DELETE"):
            scope = {"type": "http", "method": method, "path": path, "root_path": ""}
            expected = first_match(candidates, "http", method, path)
            found = direct.match(scope)
            if found is None:  # then FastAPI answers: nothing, or a partial match
                assert expected is None or expected.matches(scope)[0] is not Match.FULL
            else:
                assert found[0] is expected, (method, path)
                checked += 1
    assert checked > 500


def test_every_endpoint_is_called_directly() -> None:
    for module in app_module.route_modules():
        for route in module.router.routes:
            assert call_of(route) is not None, route.path


def test_direct_and_fastapi_answer_alike(replica: Replica) -> None:
    app = replica.app
    assert isinstance(app, app_module.CroftApp) and app.direct is not None
    direct = answers(replica)
    used = [r for r in app.router.routes if getattr(r, "_croft_call", None) is not None]
    assert len(used) >= 10  # these requests really took the direct way
    front, app.front = app.front, None  # everything through FastAPI
    try:
        through_fastapi = answers(replica)
    finally:
        app.front = front
    for request, a, b in zip(REQUESTS, direct, through_fastapi, strict=True):
        assert a == b, request
    statuses = {status for status, _ in direct}
    assert {200, 400, 404, 409, 501} <= statuses
