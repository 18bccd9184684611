"""`python -m croft.storage`: the storage service."""

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
    context.background(
        ("storage-image-deletions", core.follow_image_deletions()),
        ("storage-volume-schedules", custom.follow_schedules()),
    )


def main() -> None:
    run_service("storage", setup)


if __name__ == "__main__":
    main()
