"""What every endpoint reads from a request the LXD way: `recursion`, `filter`, `project`,
`If-Match`, and a JSON body checked against the endpoint's request model."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from croft.api import filters
from croft.api.records import DEFAULT_PROJECT
from croft.common.errors import InvalidArgument, PreconditionFailed

M = TypeVar("M", bound=BaseModel)


def recursion(request: Request) -> int:
    """0, 1 or 2; anything unparsable is 0, as in LXD."""
    try:
        value = int(request.query_params.get("recursion", "0"))
    except ValueError:
        return 0
    return max(0, min(value, 2))


def project(request: Request) -> str:
    return request.query_params.get("project") or DEFAULT_PROJECT


def filter_clauses(request: Request) -> list[filters.Clause] | None:
    text = request.query_params.get("filter", "").strip()
    return filters.parse(text) if text else None


def listing(
    records: Sequence[dict[str, Any]],
    request: Request,
    url_of: Callable[[dict[str, Any]], str],
    render: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[Any]:
    """A collection GET: filtered, then URLs (recursion 0) or full objects."""
    clauses = filter_clauses(request)
    rendered = [render(r) if render else r for r in records]
    if clauses is not None:
        rendered = [r for r in rendered if filters.matches(r, clauses)]
    if recursion(request) == 0:
        return [url_of(r) for r in rendered]
    return rendered


def check_if_match(request: Request, current: str) -> None:
    """412 when the client's `If-Match` is not the record's current ETag."""
    wanted = request.headers.get("If-Match", "").strip()
    if not wanted:
        return
    wanted = wanted.removeprefix("W/").strip('"')
    if wanted != current:
        raise PreconditionFailed(f"ETag doesn't match: {current} vs {wanted}")


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise InvalidArgument("The request has no JSON body")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"The request body is not valid JSON: {exc}") from None


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"Invalid {model.__name__} field {where!r}: {first['msg']}"


async def body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; unknown fields are ignored (as LXD's decoder does),
    wrong types are a 400 naming the field."""
    return validate(await json_body(request), model)


def validate(data: Any, model: type[M]) -> M:
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"The request body must be a JSON object ({model.__name__}), not {type(data).__name__}"
        )
    try:
        # A JSON null leaves a field at its zero value, as Go's decoder does (pylxd sends
        # "user": null, "cwd": null on every exec).
        return model.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise InvalidArgument(_describe(exc, model)) from None
