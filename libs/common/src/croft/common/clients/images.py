"""The typed client of the images service: images, aliases, pulls from image servers, blobs."""

from __future__ import annotations

import grpc

from croft.common.clients._base import RequestStream, TypedClient, record, unary
from croft.common.models import ImageAliasRecord, ImageRecord
from croft.v1 import common_pb2, images_pb2, images_pb2_grpc


class ImagesClient(TypedClient, service="images", stub=images_pb2_grpc.ImagesStub):
    resolve_image = unary("ResolveImage", images_pb2.ResolveImageRequest, images_pb2.ImageReply)
    image_files = unary("ImageFiles", images_pb2.ImageFilesRequest, images_pb2.ImageFilesReply)

    def import_image(
        self, requests: RequestStream[images_pb2.ImportChunk], *, timeout: float | None = None
    ) -> grpc.aio.StreamUnaryCall[images_pb2.ImportChunk, images_pb2.ImageReply]:
        return self.rpc.stream("ImportImage", requests, timeout=timeout)

    update_image = record("UpdateImage", common_pb2.Json, ImageRecord)
    delete_image = unary("DeleteImage", images_pb2.ImageRef, common_pb2.Empty)
    create_alias = record("CreateAlias", images_pb2.ImageAliasRequest, ImageAliasRecord)
    update_alias = record("UpdateAlias", images_pb2.ImageAliasRequest, ImageAliasRecord)
    rename_alias = record("RenameAlias", images_pb2.ImageAliasRequest, ImageAliasRecord)
    delete_alias = unary("DeleteAlias", images_pb2.ImageAliasRequest, common_pb2.Empty)

    def pull_image(
        self, request: images_pb2.PullImageRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[images_pb2.PullImageRequest, images_pb2.PullImageReply]:
        return self.rpc.stream("PullImage", request, timeout=timeout)

    def refresh_image(
        self, request: images_pb2.ImageRef, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[images_pb2.ImageRef, images_pb2.PullImageReply]:
        return self.rpc.stream("RefreshImage", request, timeout=timeout)

    def export_image(
        self, request: images_pb2.ImageRef, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[images_pb2.ImageRef, images_pb2.ExportChunk]:
        return self.rpc.stream("ExportImage", request, timeout=timeout)
