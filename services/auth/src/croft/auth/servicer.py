"""The auth service's gRPC surface: protobuf in, `TrustStore` calls, protobuf out."""

from __future__ import annotations

import json
from typing import Any

import grpc

from croft.auth.core import CertificatePut, TrustStore
from croft.common.errors import InvalidArgument
from croft.v1 import auth_pb2, auth_pb2_grpc, common_pb2


def _json(value: Any) -> common_pb2.Json:
    return common_pb2.Json(json=json.dumps(value))


class AuthServicer(auth_pb2_grpc.AuthServicer):
    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust

    async def IsTrusted(
        self, request: auth_pb2.CertificateRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.TrustReply:
        trust = await self.trust.is_trusted(request.fingerprint)
        return auth_pb2.TrustReply(
            trusted=trust.trusted,
            certificate=json.dumps(trust.certificate) if trust.certificate else "",
        )

    async def ListCertificates(
        self, request: common_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        return _json(await self.trust.list())

    async def GetCertificate(
        self, request: auth_pb2.CertificateRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        record, _ = await self.trust.find(request.fingerprint)
        return _json(record)

    async def AddCertificate(
        self, request: auth_pb2.AddCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        put = CertificatePut(
            request.name, request.type or "client", request.restricted, tuple(request.projects)
        )
        return _json(await self.trust.add(request.certificate, put, request.address))

    async def UpdateCertificate(
        self, request: common_pb2.Json, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Json:
        try:
            body = json.loads(request.json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"UpdateCertificate's request is not JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("fingerprint"), str):
            raise InvalidArgument("UpdateCertificate needs a fingerprint")
        put = CertificatePut.from_json(body)
        return _json(await self.trust.update(body["fingerprint"], put))

    async def DeleteCertificate(
        self, request: auth_pb2.CertificateRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.trust.delete(request.fingerprint)
        return common_pb2.Empty()

    async def CreateToken(
        self, request: auth_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.TokenReply:
        put = CertificatePut(
            request.name, request.type or "client", request.restricted, tuple(request.projects)
        )
        return auth_pb2.TokenReply(secret=await self.trust.create_token(put, request.expires_at))

    async def RevokeToken(
        self, request: auth_pb2.TokenSecret, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.Empty:
        await self.trust.revoke_token(request.secret)
        return common_pb2.Empty()

    async def TrustWithToken(
        self, request: auth_pb2.TrustWithTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.TrustWithTokenReply:
        record, operation_id = await self.trust.trust_with_token(
            request.secret, request.certificate, request.address
        )
        return auth_pb2.TrustWithTokenReply(
            certificate=json.dumps(record), operation_id=operation_id
        )
