"""The typed client of the auth service: the trust store, trust tokens."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

from croft.common.clients._base import TypedClient
from croft.v1 import auth_pb2, auth_pb2_grpc, common_pb2


class AuthClient(TypedClient):
    """One method per RPC of `croft.v1.Auth`, named after it in snake_case."""

    service: ClassVar[str] = "auth"
    stub = auth_pb2_grpc.AuthStub

    def is_trusted(
        self,
        request: auth_pb2.CertificateRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[auth_pb2.TrustReply]:
        return self.rpc.call("IsTrusted", request, idempotent=idempotent, timeout=timeout)

    def list_certificates(
        self, request: common_pb2.Empty, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("ListCertificates", request, idempotent=idempotent, timeout=timeout)

    def get_certificate(
        self,
        request: auth_pb2.CertificateRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("GetCertificate", request, idempotent=idempotent, timeout=timeout)

    def add_certificate(
        self,
        request: auth_pb2.AddCertificateRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("AddCertificate", request, idempotent=idempotent, timeout=timeout)

    def update_certificate(
        self, request: common_pb2.Json, *, idempotent: bool = True, timeout: float | None = None
    ) -> Awaitable[common_pb2.Json]:
        return self.rpc.call("UpdateCertificate", request, idempotent=idempotent, timeout=timeout)

    def delete_certificate(
        self,
        request: auth_pb2.CertificateRef,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("DeleteCertificate", request, idempotent=idempotent, timeout=timeout)

    def create_token(
        self,
        request: auth_pb2.CreateTokenRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[auth_pb2.TokenReply]:
        return self.rpc.call("CreateToken", request, idempotent=idempotent, timeout=timeout)

    def revoke_token(
        self,
        request: auth_pb2.TokenSecret,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[common_pb2.Empty]:
        return self.rpc.call("RevokeToken", request, idempotent=idempotent, timeout=timeout)

    def trust_with_token(
        self,
        request: auth_pb2.TrustWithTokenRequest,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> Awaitable[auth_pb2.TrustWithTokenReply]:
        return self.rpc.call("TrustWithToken", request, idempotent=idempotent, timeout=timeout)
