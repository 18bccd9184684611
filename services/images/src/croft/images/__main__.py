"""`python -m croft.images`: the images service (image and alias records, image blobs)."""

from __future__ import annotations

import asyncio

from croft.common.clients import ImagesClient
from croft.common.service import ServiceContext
from croft.common.service import main as run_service
from croft.images.blobs import BlobStore
from croft.images.core import ImagesCore
from croft.images.remote import RemoteImages
from croft.images.servicer import ImagesServicer
from croft.v1 import images_pb2_grpc


async def setup(context: ServiceContext) -> None:
    # Opening the blob store also removes temporary files of imports whose process died.
    blobs = BlobStore(context.config.images_dir)

    async def peer(member: str) -> ImagesClient:
        return ImagesClient(
            await context.client(ImagesClient.service, ImagesClient.stub, member=member)
        )

    core = ImagesCore(context.store, blobs, context.config.member, peer)
    remote = RemoteImages(core, context.config.images)
    images_pb2_grpc.add_ImagesServicer_to_server(ImagesServicer(core, remote), context.server.grpc)
    # Auto-update and expiry of cached images, in the background for the process's life.
    stop = asyncio.Event()
    tasks = asyncio.create_task(remote.run_tasks(stop))

    async def stop_tasks() -> None:
        stop.set()
        try:
            await asyncio.wait_for(tasks, 30)
        except TimeoutError:
            tasks.cancel()

    context.shutdown_hooks.append(stop_tasks)


def main() -> None:
    run_service("images", setup)


if __name__ == "__main__":
    main()
