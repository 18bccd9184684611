"""`/1.0/projects`: for now only the `default` project, read-only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.context import context
from croft.common.errors import NotFound, NotImplementedYet
from croft.common.store import Store

router = APIRouter()

# Kinds of records that belong to a project and show in its `used_by`.
PROJECT_SCOPED = ("instances", "profiles", "images", "networks")


async def used_by(store: Store, project: str) -> list[str]:
    urls: list[str] = []
    for kind in PROJECT_SCOPED:
        for entry in await store.list(records.record_prefix(kind, project)):
            name = entry.key.rsplit("/", 1)[1]
            urls.append(records.url(kind, name, project))
    return urls


async def render(store: Store, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": record.get("config", {}),
        "description": record.get("description", ""),
        "name": record["name"],
        "used_by": await used_by(store, record["name"]),
    }


def writable(record: dict[str, Any]) -> list[Any]:
    return [record.get("config", {}), record.get("description", "")]


@router.get("/1.0/projects")
async def projects_list(request: Request) -> Response:
    store = context(request).store
    entries = await store.list(f"{records.RECORDS}projects/")
    rendered = [await render(store, entry.json()) for entry in entries]
    return responses.sync(
        query.listing(rendered, request, lambda p: records.url("projects", p["name"]))
    )


@router.get("/1.0/projects/{name}")
async def project_get(request: Request, name: str) -> Response:
    store = context(request).store
    found = await store.get_json(records.project_key(name))
    if found is None:
        raise NotFound("Project not found")
    record = found[0]
    return responses.sync(await render(store, record), etag=records.etag(writable(record)))


@router.post("/1.0/projects")
async def projects_post(request: Request) -> Response:
    raise NotImplementedYet("croft has only the default project for now")


@router.api_route("/1.0/projects/{name}", methods=["PUT", "PATCH", "POST", "DELETE"])
async def project_change(request: Request, name: str) -> Response:
    store = context(request).store
    if await store.get(records.project_key(name)) is None:
        raise NotFound("Project not found")
    raise NotImplementedYet("croft's projects cannot be changed yet")
