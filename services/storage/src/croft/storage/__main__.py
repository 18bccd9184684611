"""`python -m croft.storage`: the storage service."""

import asyncio
import contextlib

from croft.common.service import ServiceContext
from croft.common.service import main as run_service
from croft.storage.core import StorageCore
from croft.storage.servicer import StorageServicer
from croft.storage.volumes import CustomVolumes
from croft.v1 import storage_pb2_grpc


async def setup(context: ServiceContext) -> None:
    """Pools ready (the default one created at first start) before the service registers."""
    core = StorageCore(context)
    await core.start()
    custom = CustomVolumes(core)
    await custom.reconcile()
    storage_pb2_grpc.add_StorageServicer_to_server(
        StorageServicer(core, custom), context.server.grpc
    )
    tasks = [
        asyncio.create_task(core.follow_image_deletions(), name="storage-image-deletions"),
        asyncio.create_task(custom.follow_schedules(), name="storage-volume-schedules"),
    ]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    context.shutdown_hooks.append(stop)


def main() -> None:
    run_service("storage", setup)


if __name__ == "__main__":
    main()
