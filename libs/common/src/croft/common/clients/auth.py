"""The typed client of the auth service: the trust store, trust tokens."""

from __future__ import annotations

from collections.abc import Awaitable

from typing_extensions import Unpack

from croft.common.clients._base import CallOptions, TypedClient
from croft.v1 import auth_pb2, auth_pb2_grpc, common_pb2


class AuthClient(TypedClient, service="auth", stub=auth_pb2_grpc.AuthStub):
    def is_trusted(
        self, request: auth_pb2.CertificateRef, **options: Unpack[CallOptions]
    ) -> Awaitable[auth_pb2.TrustReply]:
        return self._unary("IsTrusted", request, options)

    def list_certificates(
        self, request: common_pb2.Empty, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("ListCertificates", request, options)

    def get_certificate(
        self, request: auth_pb2.CertificateRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("GetCertificate", request, options)

    def add_certificate(
        self, request: auth_pb2.AddCertificateRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("AddCertificate", request, options)

    def update_certificate(
        self, request: common_pb2.Json, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Json]:
        return self._unary("UpdateCertificate", request, options)

    def delete_certificate(
        self, request: auth_pb2.CertificateRef, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("DeleteCertificate", request, options)

    def create_token(
        self, request: auth_pb2.CreateTokenRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[auth_pb2.TokenReply]:
        return self._unary("CreateToken", request, options)

    def revoke_token(
        self, request: auth_pb2.TokenSecret, **options: Unpack[CallOptions]
    ) -> Awaitable[common_pb2.Empty]:
        return self._unary("RevokeToken", request, options)

    def trust_with_token(
        self, request: auth_pb2.TrustWithTokenRequest, **options: Unpack[CallOptions]
    ) -> Awaitable[auth_pb2.TrustWithTokenReply]:
        return self._unary("TrustWithToken", request, options)
