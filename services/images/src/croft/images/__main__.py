"""`python -m croft.images`: the images service (image and alias records, image blobs)."""

from __future__ import annotations

from croft.common.service import ServiceContext
from croft.common.service import main as run_service
from croft.images.blobs import BlobStore
from croft.images.core import ImagesCore
from croft.images.servicer import ImagesServicer
from croft.v1 import images_pb2_grpc


async def setup(context: ServiceContext) -> None:
    # Opening the blob store also removes temporary files of imports whose process died.
    blobs = BlobStore(context.config.images_dir)
    core = ImagesCore(context.store, blobs, context.config.member)
    images_pb2_grpc.add_ImagesServicer_to_server(ImagesServicer(core), context.server.grpc)


def main() -> None:
    run_service("images", setup)


if __name__ == "__main__":
    main()
