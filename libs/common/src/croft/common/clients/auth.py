"""The typed client of the auth service: the trust store, trust tokens."""

from __future__ import annotations

from croft.common.clients._base import TypedClient, unary
from croft.v1 import auth_pb2, auth_pb2_grpc, common_pb2


class AuthClient(TypedClient, service="auth", stub=auth_pb2_grpc.AuthStub):
    is_trusted = unary("IsTrusted", auth_pb2.CertificateRef, auth_pb2.TrustReply)
    list_certificates = unary("ListCertificates", common_pb2.Empty, common_pb2.Json)
    get_certificate = unary("GetCertificate", auth_pb2.CertificateRef, common_pb2.Json)
    add_certificate = unary("AddCertificate", auth_pb2.AddCertificateRequest, common_pb2.Json)
    update_certificate = unary("UpdateCertificate", common_pb2.Json, common_pb2.Json)
    delete_certificate = unary("DeleteCertificate", auth_pb2.CertificateRef, common_pb2.Empty)
    create_token = unary("CreateToken", auth_pb2.CreateTokenRequest, auth_pb2.TokenReply)
    revoke_token = unary("RevokeToken", auth_pb2.TokenSecret, common_pb2.Empty)
    trust_with_token = unary(
        "TrustWithToken", auth_pb2.TrustWithTokenRequest, auth_pb2.TrustWithTokenReply
    )
