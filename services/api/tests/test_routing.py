"""Route order: the busiest routes go first, and no request is answered by another route
because of it."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from starlette.routing import Match

from croft.api import app as app_module

# Values for path parameters, including the literal segments of other routes: the
# places where two routes could both fit one path.
SAMPLES = ("x", "aliases", "secret", "state", "exec", "websocket", "refresh", "export")


def first_match(routes: list[Any], kind: str, method: str, path: str) -> Any:
    scope = {"type": kind, "method": method, "path": path, "root_path": ""}
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
        if match == Match.PARTIAL and partial is None:
            partial = route
    return partial


def fitting(routes: list[Any], path: str) -> list[Any]:
    """The routes whose pattern fits `path`, in their order. Every other route answers
    Match.NONE for that path whatever the method and scope type (starlette tries the
    pattern first), so the first match among these is the first match among all."""
    return [r for r in routes if r.path_regex.match(path)]


def unique_paths(routes: list[Any]) -> list[str]:
    """Every concrete path of every route, each once."""
    return sorted({p for route in routes for p in concrete_paths(route.path)})


def concrete_paths(pattern: str) -> list[str]:
    params = re.findall(r"{[^}]+}", pattern)
    paths = []
    for values in itertools.product(SAMPLES, repeat=len(params)):
        path = pattern
        for param, value in zip(params, values, strict=True):
            sample = f"{value}/{value}" if param.endswith(":path}") else value
            path = path.replace(param, sample, 1)
        paths.append(path)
    return paths


def test_busiest_first_changes_no_answer() -> None:
    original = [r for m in app_module.route_modules() for r in m.router.routes]
    reordered = app_module.busiest_first(original, app_module.HOT_PATHS)
    assert sorted(map(id, reordered)) == sorted(map(id, original))
    assert reordered[0].path == app_module.HOT_PATHS[0]
    checked = 0
    for path in unique_paths(original):
        before, after = fitting(original, path), fitting(reordered, path)
        for method in ("GET", "PUT", "PATCH", "POST", "DELETE"):
            for kind in ("http", "websocket"):
                expected = first_match(before, kind, method, path)
                assert first_match(after, kind, method, path) is expected, (kind, method, path)
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    "hot",
    [
        ("/1.0/images/{fingerprint}",),  # GET /1.0/images/aliases is the alias list
        ("/1.0/images/aliases/{name:path}",),  # POST .../aliases/secret is an image secret
    ],
)
def test_a_move_that_would_change_an_answer_is_refused(hot: tuple[str, ...]) -> None:
    original = [r for m in app_module.route_modules() for r in m.router.routes]
    with pytest.raises(RuntimeError, match="cannot go before"):
        app_module.busiest_first(original, hot)
