"""`POST /1.0/images/<fingerprint>/secret`: LXD's one-time secret for a private image.

A trusted client asks for a secret; it lives in a token operation (Running until used or
cancelled). An untrusted client that presents it with `?secret=` may read that one image
and export it, as LXD allows, so that another daemon can pull a private image; the
export uses the secret up.
"""

from __future__ import annotations

import secrets as token_source

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from croft.api import responses
from croft.api.context import context
from croft.api.domain import projects
from croft.api.domain.images import find_image, image_project_url

router = APIRouter()


@router.post("/1.0/images/{fingerprint}/secret")
async def image_secret(request: Request, fingerprint: str) -> Response:
    ctx = context(request)
    project = await projects.scope(request, "images")
    record, _ = await find_image(ctx.store, project, fingerprint.lower())
    full = record["fingerprint"]
    operation = await ctx.operations.create(
        "Generating image secret",
        cls="token",
        metadata={"secret": token_source.token_hex(32)},
        resources={"images": [image_project_url(full, project)]},
        project=project,
    )
    return responses.async_operation(operation)
