"""Images as the handlers see them: finding one, the images service's calls, pulls from
image servers (for `POST /1.0/images` and for an instance's image), and the one-time
secrets that open a private image to an untrusted client.

Records are the images service's (`croft.images.core` describes them): they are read
straight from the store, and every change is asked of the images service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.requests import HTTPConnection

from croft.api import records
from croft.api.context import ApiContext
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.clients import ImagesClient
from croft.common.errors import CroftError, NotFound
from croft.common.projects import owning_project
from croft.common.records import public
from croft.common.rpc import from_rpc_error
from croft.common.store import Store
from croft.imageformat.records import find as _find
from croft.imageformat.records import lookup as image_lookup
from croft.imageformat.records import used_lately
from croft.v1 import images_pb2

# For the routes: an image by any unique prefix of its fingerprint, as in LXD.
find_image = _find

IMAGES = "images"
ALIASES = "image-aliases"
ALIAS_NOT_FOUND = "Image alias not found"


class ImageSource(BaseModel):
    """An image a request names, here or on an image server: the fields LXD's
    InstanceSource (an instance's image) and ImagesPostSource (a pull) share."""

    model_config = ConfigDict(extra="ignore")
    type: StrictStr = ""
    alias: StrictStr = ""
    fingerprint: StrictStr = ""
    server: StrictStr = ""
    protocol: StrictStr = ""
    certificate: StrictStr = ""


P = ParamSpec("P")
R = TypeVar("R")


def image_url(fingerprint: str) -> str:
    return f"/1.0/images/{fingerprint}"


async def image_created(
    ctx: ApiContext, image: dict[str, Any], project: str, request: HTTPConnection
) -> dict[str, Any]:
    """Announce a new image (`image-created`); what the operation that made it returns,
    as LXD's: its fingerprint and size."""
    await ctx.lifecycle(
        "image-created",
        image_url(image["fingerprint"]),
        project=project,
        context={"type": image.get("type", "container")},
        request=request,
    )
    return {"fingerprint": image["fingerprint"], "size": str(image["size"])}


def alias_url(name: str, project: str) -> str:
    return records.url("images/aliases", name, project)


async def find_alias(store: Store, project: str, name: str) -> tuple[dict[str, Any], int]:
    entry = await store.get(records.record_key(ALIASES, project, name))
    if entry is None:
        raise NotFound(ALIAS_NOT_FOUND)
    return entry.json(), entry.revision


async def images_call(
    method: Callable[Concatenate[ImagesClient, P], Awaitable[R]], *args: P.args, **kwargs: P.kwargs
) -> R:
    """`method` of the images service (`ImagesClient.create_alias`...), called on a client
    from this process's pool with `args` and `kwargs`."""
    return await method(await services().images(), *args, **kwargs)


# ---------------------------------------------------------------------------- pulls

PULL_TIMEOUT = 6 * 3600.0  # seconds for a download from a remote server
PROGRESS_EVERY = 0.5  # seconds between download_progress updates of an operation


async def pull_image(
    request: images_pb2.PullImageRequest,
    op: OperationContext | None = None,
) -> dict[str, Any]:
    """Run a PullImage on the images service; with `op`, its progress becomes the
    operation's `download_progress`, as in LXD. Returns the image (LXD's Image)."""
    client = await services().images()
    call = client.pull_image(request, timeout=PULL_TIMEOUT)
    image: dict[str, Any] | None = None
    shown = 0.0
    try:
        async for reply in call:
            if reply.WhichOneof("part") == "record":
                image = json.loads(reply.record)
            elif op is not None:
                now = asyncio.get_running_loop().time()
                if now - shown >= PROGRESS_EVERY:
                    shown = now
                    await op.update_metadata({"download_progress": reply.progress})
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    except BaseException:
        call.cancel()
        raise
    if image is None:
        raise CroftError("the images service ended the download without an image")
    return image


async def resolve_image(store: Any, project: str, source: ImageSource) -> dict[str, Any]:
    """The image a source names. NotFound in LXD's words: `Image alias not found` for an
    alias (as LXD, 404), `Image not found` for a fingerprint (LXD fails the operation
    instead: "Image not provided for instance creation").

    It is looked up in the store (the api's copy of it); the images service, the image's
    owner, is asked only to record the use, when that changes its last_used_at. A
    project without `features.images` uses `default`'s images."""
    project = await owning_project(store, project, IMAGES)
    if source.server:
        return await pull_image_for_instance(project, source)
    name = source.fingerprint or source.alias
    not_found = "Image not found" if source.fingerprint else "Image alias not found"
    try:
        record, _ = await image_lookup(store, project, name)
    except NotFound:
        raise NotFound(not_found) from None
    if used_lately(record):
        return public(record)
    images = await services().images()
    try:
        reply = await images.resolve_image(
            images_pb2.ResolveImageRequest(project=project, name=name, mark_used=True),
        )
    except NotFound:
        raise NotFound(not_found) from None
    image: dict[str, Any] = json.loads(reply.record)
    return image


async def pull_image_for_instance(project: str, source: ImageSource) -> dict[str, Any]:
    """An image from a remote server, through the images service's cache (LXD's
    ImageDownload with SetCached and PreferCached): the first use downloads it and records it
    `cached`, later ones take the cached copy; it auto-updates when the server config
    `images.auto_update_cached` (default true) says so."""
    store = services().context.store
    settings: dict[str, str] = {}
    found = await store.get_json(records.SERVER_CONFIG_KEY)
    if found is not None:
        settings.update(found[0].get("config") or {})
    owner = await store.get_json(records.project_key(project))
    if owner is not None:
        settings.update({k: v for k, v in (owner[0].get("config") or {}).items() if v != ""})
    auto_update = settings.get("images.auto_update_cached", "true").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    pull = images_pb2.PullImageRequest(
        project=project,
        source=images_pb2.RemoteSource(
            server=source.server,
            protocol=source.protocol or "lxd",
            alias=source.alias or source.fingerprint,
            certificate=source.certificate,
        ),
        auto_update=auto_update,
        cached=True,
    )
    return await pull_image(pull)


# ---------------------------------------------------------------------------- secrets


def image_project_url(fingerprint: str, project: str) -> str:
    return records.url("images", fingerprint, project)


async def _token(ctx: ApiContext, project: str, fingerprint: str, secret: str) -> dict[str, Any]:
    url = image_project_url(fingerprint, project)
    for record in await ctx.operations.list(project):
        operation: dict[str, Any] = record["operation"]
        if (
            operation["class"] == "token"
            and operation["status"] == "Running"
            and (operation.get("metadata") or {}).get("secret") == secret
            and url in ((operation.get("resources") or {}).get("images") or [])
        ):
            return operation
    raise NotFound(f'Image "{fingerprint}" not found')


async def secret_grants(
    ctx: ApiContext, project: str, fingerprint: str, secret: str, *, use_up: bool = False
) -> bool:
    """Whether `secret` opens image `fingerprint` (full) to an untrusted client; with
    `use_up`, the secret cannot be used again."""
    if not secret:
        return False
    try:
        operation = await _token(ctx, project, fingerprint, secret)
    except NotFound:
        return False
    if use_up:
        try:
            await ctx.operations.cancel(operation["id"])
        except CroftError:
            return False  # used by someone else in between
    return True
