"""What every endpoint reads from a request the LXD way: `recursion`, `filter`, `project`,
`If-Match`, and a JSON body checked against the endpoint's request model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from croft.api import authz, filters, limits
from croft.api.records import DEFAULT_PROJECT
from croft.common.errors import InvalidArgument, NotFound, PreconditionFailed

M = TypeVar("M", bound=BaseModel)


# LXD's answer for a name no object of a collection can have, by the path segment
# before the name.
_NOT_FOUND = {
    "instances": "Instance not found",
    "containers": "Instance not found",
    "snapshots": "Snapshot not found",
    "profiles": "Profile not found",
    "networks": "Network not found",
    "storage-pools": "Storage pool not found",
    "volumes": "Storage pool volume not found",
    "projects": "Project not found",
    "aliases": "Image alias not found",
    "images": "Image not found",
    "certificates": "Certificate not found",
    "operations": "Operation not found",
}


def check_path_names(route_path: str, params: dict[str, Any]) -> None:
    """NotFound, as LXD words it for the collection, when a `{name}` in the request's
    path is one no object can have: "." or "..", a control character, more than
    MAX_NAME characters. Every handler can then use the names it gets in store keys
    and host paths. A `{...:path}` of the simplestreams tree is the handler's to check."""
    for param, value in params.items():
        if not isinstance(value, str) or param == "path":
            continue
        if (
            value in (".", "..")
            or len(value) > limits.MAX_NAME
            or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value)
        ):
            before = route_path.split("{" + param, 1)[0].rstrip("/").rsplit("/", 1)[-1]
            raise NotFound(_NOT_FOUND.get(before, "not found"))


def check_query(request: Request) -> None:
    """InvalidArgument when a query parameter holds a NUL (no name, path or filter can,
    and the host's calls would refuse it half-way through a request)."""
    for key, value in request.query_params.multi_items():
        if "\x00" in key or "\x00" in value:
            raise InvalidArgument(
                f"The query parameter {limits.quote(key)} contains a NUL character"
            )


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
    held = authz.grants(request)
    if held is not None:  # a caller held to grants sees what it may view only
        asked = project(request)
        rendered = [r for r in rendered if authz.viewable(held, url_of(r), asked)]
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


async def read_body(request: Request, limit: int = limits.MAX_BODY) -> bytes:
    """The request's body, refused (400) once it is larger than `limit` bytes: by its
    Content-Length before any of it is read, else as it streams in."""
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidArgument(f"The request body is larger than {limits.size(limit)}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise InvalidArgument(f"The request body is larger than {limits.size(limit)}")
    body = bytes(raw)
    request._body = body  # as Request.body() keeps it, for a second read
    return body


async def json_body(request: Request) -> Any:
    """The JSON body, held to croft.api.limits (size, nesting, strings, numbers)."""
    raw = getattr(request, "_body", None)
    if raw is None:
        raw = await read_body(request)
    if not raw.strip():
        raise InvalidArgument("The request has no JSON body")
    return limits.parse_json(raw)


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    # The location may hold a client's key: quoted safely and not at any length.
    return f"Invalid {model.__name__} field {limits.quote(where)}: {first['msg']}"


async def body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; unknown fields are ignored (as LXD's decoder does),
    wrong types are a 400 naming the field."""
    return validate(await json_body(request), model)


def validate(data: Any, model: type[M]) -> M:
    """`data`, a body from `json_body` (so already held to croft.api.limits), as
    `model`; InvalidArgument naming the first field that does not fit."""
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
