"""Instances into images: the publish sources of `POST /1.0/images` (`source.type`
instance or snapshot).

The compute service of the instance's member tars the instance (or snapshot) volume,
and that tarball streams straight into the images service's import, as if it were an
upload: the images service fingerprints, validates and records it, or keeps nothing. As
in LXD 5.0.2, it is the "Downloading image" operation, a running instance is refused
("Cannot export a running instance as an image": `lxc publish --force` stops it first),
and the operation's metadata is `{"fingerprint", "size"}`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response

from croft.api import responses
from croft.api.context import context
from croft.api.domain.images import image_created
from croft.api.operations import OperationContext
from croft.api.services import services
from croft.common.errors import CroftError, InvalidArgument, NotFound
from croft.common.models import InstanceRecord
from croft.common.rpc import from_rpc_error
from croft.v1 import common_pb2, compute_pb2, images_pb2

PUBLISH_TIMEOUT = 3600.0  # seconds to tar an instance and import the image
COMPRESSIONS = frozenset({"", "gzip", "xz", "none"})  # what compute's tar makes


def _publish_request(body: dict[str, Any]) -> tuple[str, str, dict[str, str] | None]:
    """(instance, snapshot, properties) of an ImagesPost whose source is an instance or a
    snapshot; InvalidArgument for anything malformed."""
    source = body.get("source")
    assert isinstance(source, dict)
    name = source.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("The source instance name is required")
    instance, _, snapshot = name.partition("/")
    if source.get("type") == "snapshot" and not snapshot:
        raise InvalidArgument(f'"{name}" is not a snapshot name (INSTANCE/SNAPSHOT)')
    if not instance or "/" in snapshot:
        raise InvalidArgument(f'Invalid instance name "{name}"')
    properties = body.get("properties")
    if properties is not None and (
        not isinstance(properties, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in properties.items())
    ):
        raise InvalidArgument("properties must map names to strings")
    for key in ("expires_at", "compression_algorithm"):
        if not isinstance(body.get(key) or "", str):
            raise InvalidArgument(f"{key} must be a string")
    if (body.get("compression_algorithm") or "") not in COMPRESSIONS:
        raise InvalidArgument(
            f'Unsupported compression algorithm "{body["compression_algorithm"]}" '
            "(gzip, xz or none)"
        )
    if not isinstance(body.get("public", False), bool):
        raise InvalidArgument("public must be true or false")
    return instance, snapshot, properties


def _alias_names(body: dict[str, Any]) -> list[str]:
    aliases = body.get("aliases") or []
    if not isinstance(aliases, list) or not all(
        isinstance(a, dict) and isinstance(a.get("name"), str) and a["name"] for a in aliases
    ):
        raise InvalidArgument("aliases must be a list of {name, description}")
    return [a["name"] for a in aliases]


async def publish_image(request: Request, project: str, body: dict[str, Any]) -> Response:
    """POST /1.0/images from `source: {type: instance|snapshot, name}`: the image of an
    instance (stopped) or of a snapshot, recorded with `properties` (replacing those of
    the instance's metadata.yaml when given), `public`, `aliases` and `expires_at`."""
    ctx = context(request)
    instance, snapshot, properties = _publish_request(body)
    aliases = _alias_names(body)
    public = bool(body.get("public", False))
    expires_at = str(body.get("expires_at") or "")
    compression = str(body.get("compression_algorithm") or "")

    async def run(op: OperationContext) -> dict[str, Any] | None:
        found = await ctx.store.get_json(InstanceRecord.store_key(project, instance))
        meta = InstanceRecord.meta_of(found[0]) if found is not None else None
        if meta is None or meta.creating:
            raise NotFound("Instance not found")
        compute = await services().compute(meta.member)
        tarball = compute.publish_instance(
            compute_pb2.PublishRequest(
                instance=common_pb2.InstanceRef(project=project, name=instance),
                snapshot=snapshot,
                properties=json.dumps(properties) if properties is not None else "",
                expires_at=expires_at,
                compression=compression,
            ),
            timeout=PUBLISH_TIMEOUT,
        )
        image = await _import_tarball(tarball, project, public, aliases)
        return await image_created(ctx, image, project, request)

    operation = await ctx.operations.create("Downloading image", run=run, project=project)
    return responses.async_operation(operation)


async def _import_tarball(
    tarball: Any, project: str, public: bool, aliases: list[str]
) -> dict[str, Any]:
    """Feed the PublishInstance stream into an ImportImage call; the image record. When
    either side fails, both calls end and the first error is raised: the images service
    keeps nothing of an import that did not finish."""
    failure: list[CroftError] = []
    header = images_pb2.ImportHeader(project=project, public=public, aliases=aliases)

    async def chunks() -> AsyncIterator[images_pb2.ImportChunk]:
        yield images_pb2.ImportChunk(header=header)
        try:
            async for piece in tarball:
                yield images_pb2.ImportChunk(data=piece.data)
        except grpc.aio.AioRpcError as exc:
            failure.append(from_rpc_error(exc))
            importing.cancel()

    client = await services().images()
    importing = client.import_image(chunks(), timeout=PUBLISH_TIMEOUT)
    try:
        reply = await importing
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
        if failure:
            raise failure[0] from None
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise from_rpc_error(exc) from None
    finally:
        tarball.cancel()
    image: dict[str, Any] = json.loads(reply.record)
    return image
