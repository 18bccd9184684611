"""The member's internal certificate (croft.common.internal_tls): made once, made again
when the authority or the member's address changes, and only ever trusted by members of
the same authority (checked with a real TLS handshake)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from croft.common import internal_tls
from croft.common.internal_tls import Identity


def _ips(identity: Identity) -> set[str]:
    cert = x509.load_pem_x509_certificate(identity.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def test_made_once_kept_and_private(tmp_path: Path) -> None:
    first = internal_tls.ensure(tmp_path)
    again = internal_tls.ensure(tmp_path)
    assert again == first
    assert _ips(first) == {"127.0.0.1", "::1"}
    assert first.directory.stat().st_mode & 0o777 == 0o700
    for secret in ("ca.key", "member.key"):
        assert (first.directory / secret).stat().st_mode & 0o777 == 0o600


def test_a_new_address_or_authority_makes_a_new_member_certificate(tmp_path: Path) -> None:
    first = internal_tls.ensure(tmp_path)
    moved = internal_tls.ensure(tmp_path, "10.77.1.11")
    assert moved.ca == first.ca and moved.cert != first.cert
    assert "10.77.1.11" in _ips(moved)
    # A joining member is given the cluster's authority: its certificate follows.
    cluster = internal_tls.ensure(tmp_path / "cluster")
    certificate, key = internal_tls.read_authority(tmp_path / "cluster")
    internal_tls.write_authority(tmp_path, certificate, key)
    joined = internal_tls.ensure(tmp_path, "10.77.1.11")
    assert joined.ca == cluster.ca
    signed_by = x509.load_pem_x509_certificate(cluster.ca)
    x509.load_pem_x509_certificate(joined.cert).verify_directly_issued_by(signed_by)
    assert ipaddress.ip_address("10.77.1.11") in {ipaddress.ip_address(ip) for ip in _ips(joined)}


async def test_only_the_same_authority_gets_through_a_handshake(tmp_path: Path) -> None:
    ours = internal_tls.ensure(tmp_path / "a")
    internal_tls.ensure(tmp_path / "b")  # a standalone croft first, with its own authority
    certificate, key = internal_tls.read_authority(tmp_path / "a")
    internal_tls.write_authority(tmp_path / "b", certificate, key)
    member = internal_tls.ensure(tmp_path / "b")
    stranger = internal_tls.ensure(tmp_path / "c")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", ours.server_credentials())
    await server.start()

    async def answers(identity: Identity) -> bool:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", identity.channel_credentials(), internal_tls.GRPC_OPTIONS
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
            except grpc.aio.AioRpcError:
                return False
            return True

    try:
        assert await answers(ours)
        assert await answers(member)
        assert not await answers(stranger)
    finally:
        await server.stop(None)
        await asyncio.sleep(0)
