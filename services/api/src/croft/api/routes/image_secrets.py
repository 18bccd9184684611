"""`POST /1.0/images/<fingerprint>/secret`: LXD's one-time secret for a private image.

A trusted client asks for a secret; it lives in a token operation (Running until used or
cancelled). An untrusted client that presents it with `?secret=` may read that one image
and export it, as LXD allows, so that another daemon can pull a private image; the
export uses the secret up.
"""

from __future__ import annotations

import secrets as token_source
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import query, records, responses
from croft.api.app import ApiContext, context
from croft.common.errors import CroftError, NotFound

router = APIRouter()


def _image_url(fingerprint: str, project: str) -> str:
    return records.url("images", fingerprint, project)


@router.post("/1.0/images/{fingerprint}/secret")
async def image_secret(request: Request, fingerprint: str) -> Response:
    from croft.api.routes.images import find_image

    ctx = context(request)
    project = query.project(request)
    record, _ = await find_image(ctx.store, project, fingerprint.lower())
    full = record["fingerprint"]
    operation = await ctx.operations.create(
        "Generating image secret",
        cls="token",
        metadata={"secret": token_source.token_hex(32)},
        resources={"images": [_image_url(full, project)]},
        project=project,
    )
    return responses.async_operation(operation)


async def _token(ctx: ApiContext, project: str, fingerprint: str, secret: str) -> dict[str, Any]:
    url = _image_url(fingerprint, project)
    for record in await ctx.operations.list(project):
        operation = record["operation"]
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
