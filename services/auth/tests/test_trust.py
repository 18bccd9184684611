"""The trust store on a real etcd: certificates a person trusts and un-trusts, and trust
tokens used once, revoked, expired. Token operations are made by the api's real
OperationManager on the same store, as `lxc config trust add --name X` makes them."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from croft.api.operations import OperationManager
from croft.auth.core import CertificatePut, TrustStore, parse_certificate, token_key
from croft.common.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from croft.common.store import Store, connect
from croft.common.testing.etcd import EtcdServer

PREFIX = "croft-auth-test-"


def make_certificate(name: str, *, rsa_bits: int = 0, days: int = 30, expired: bool = False) -> str:
    """A self-signed client certificate, PEM, as `lxc` makes them (EC P-384) or RSA."""
    key = (
        rsa.generate_private_key(65537, rsa_bits)
        if rsa_bits
        else ec.generate_private_key(ec.SECP384R1())
    )
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(days=400 if expired else 1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def certs() -> dict[str, str]:
    return {
        "alice": make_certificate("alice"),
        "bob": make_certificate("bob"),
        "weak": make_certificate("weak", rsa_bits=1024),
        "expired": make_certificate("expired", expired=True),
    }


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(prefix=f"{PREFIX}etcd-") as server:
        yield server


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[Store]:
    store = await connect(etcd.endpoints)
    await store.delete_prefix("/croft/")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def operations(store: Store) -> AsyncIterator[OperationManager]:
    manager = OperationManager(store, lease_ttl=2, keep_finished=1.0)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.close()


async def token_operation(operations: OperationManager, secret: str) -> str:
    operation = await operations.create(
        "Executing operation", cls="token", metadata={"secret": secret, "request": {}}
    )
    return str(operation["id"])


# ---------------------------------------------------------------------------- certificates


async def test_trust_a_certificate_then_stop_trusting_it(
    store: Store, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    alice = parse_certificate(certs["alice"])
    assert not (await trust.is_trusted(alice.fingerprint)).trusted

    record = await trust.add(certs["alice"], CertificatePut(), "192.0.2.9")
    assert record["fingerprint"] == alice.fingerprint
    assert record["name"] == "alice"  # the CN when no name is given
    assert record["type"] == "client"
    answer = await trust.is_trusted(alice.fingerprint)
    assert answer.trusted and answer.certificate is not None
    assert answer.certificate["name"] == "alice" and "certificate" not in answer.certificate
    assert [c["fingerprint"] for c in await trust.list()] == [alice.fingerprint]
    found, _ = await trust.find(alice.fingerprint[:8])
    assert parse_certificate(found["certificate"]).fingerprint == alice.fingerprint

    with pytest.raises(Conflict, match="already in trust store"):
        await trust.add(certs["alice"], CertificatePut(name="again"))

    assert await trust.delete(alice.fingerprint[:12]) == alice.fingerprint
    assert not (await trust.is_trusted(alice.fingerprint)).trusted
    assert await trust.list() == []
    with pytest.raises(NotFound, match="Certificate not found"):
        await trust.delete(alice.fingerprint)


async def test_rename_and_restrict_a_certificate(store: Store, certs: dict[str, str]) -> None:
    trust = TrustStore(store)
    record = await trust.add(certs["bob"], CertificatePut(name="bob-laptop"))
    updated = await trust.update(
        record["fingerprint"], CertificatePut("bob", "client", True, ("dev",))
    )
    assert (updated["name"], updated["restricted"], updated["projects"]) == ("bob", True, ["dev"])
    answer = await trust.is_trusted(record["fingerprint"])
    assert answer.certificate is not None and answer.certificate["projects"] == ["dev"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "No certificate provided"),
        ("not a certificate", "Invalid certificate material"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "Invalid certificate"),
    ],
)
async def test_bad_certificates_are_refused_and_nothing_is_stored(
    store: Store, text: str, message: str
) -> None:
    trust = TrustStore(store)
    with pytest.raises(InvalidArgument, match=message):
        await trust.add(text, CertificatePut())
    assert await trust.list() == []


async def test_weak_and_expired_certificates_are_refused(
    store: Store, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    with pytest.raises(InvalidArgument, match="RSA key is too weak"):
        await trust.add(certs["weak"], CertificatePut())
    with pytest.raises(InvalidArgument, match="expired"):
        await trust.add(certs["expired"], CertificatePut())
    with pytest.raises(InvalidArgument, match="Unknown certificate type"):
        CertificatePut(type="admin")
    assert await trust.list() == []


# ---------------------------------------------------------------------------- tokens


async def test_a_token_trusts_one_certificate_once(
    store: Store, operations: OperationManager, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    secret = await trust.create_token(CertificatePut(name="ci", projects=("dev",)))
    op_id = await token_operation(operations, secret)

    record, used_op = await trust.trust_with_token(secret, certs["alice"], "192.0.2.7")
    assert used_op == op_id
    assert record["name"] == "ci" and record["projects"] == ["dev"]
    assert (await trust.is_trusted(record["fingerprint"])).trusted
    assert await store.get(token_key(secret)) is None

    # Used: the same token trusts nobody else, even while its operation still runs.
    with pytest.raises(PermissionDenied, match="No matching certificate add operation"):
        await trust.trust_with_token(secret, certs["bob"])
    assert len(await trust.list()) == 1


async def test_a_token_whose_operation_was_deleted_is_revoked(
    store: Store, operations: OperationManager, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    secret = await trust.create_token(CertificatePut(name="gone"))
    op_id = await token_operation(operations, secret)
    await operations.cancel(op_id, wait=5)  # `lxc config trust revoke-token gone`
    with pytest.raises(PermissionDenied):
        await trust.trust_with_token(secret, certs["alice"])
    assert await trust.list() == []
    assert await store.get(token_key(secret)) is None


async def test_an_expired_token_and_a_wrong_secret_trust_nobody(
    store: Store, operations: OperationManager, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    past = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)).isoformat()
    secret = await trust.create_token(CertificatePut(name="late"), expires_at=past)
    await token_operation(operations, secret)
    with pytest.raises(PermissionDenied, match="Token has expired"):
        await trust.trust_with_token(secret, certs["alice"])
    with pytest.raises(PermissionDenied):
        await trust.trust_with_token("0" * 64, certs["alice"])
    assert await trust.list() == []


async def test_a_token_with_a_bad_certificate_is_kept(
    store: Store, operations: OperationManager, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    secret = await trust.create_token(CertificatePut(name="retry"))
    await token_operation(operations, secret)
    with pytest.raises(InvalidArgument):
        await trust.trust_with_token(secret, certs["expired"])
    record, _ = await trust.trust_with_token(secret, certs["bob"])
    assert record["name"] == "retry"


async def test_two_clients_racing_for_one_token(
    store: Store, operations: OperationManager, certs: dict[str, str]
) -> None:
    trust = TrustStore(store)
    secret = await trust.create_token(CertificatePut(name="race"))
    await token_operation(operations, secret)
    results = await asyncio.gather(
        trust.trust_with_token(secret, certs["alice"]),
        trust.trust_with_token(secret, certs["bob"]),
        return_exceptions=True,
    )
    assert sum(1 for r in results if isinstance(r, tuple)) == 1
    assert sum(1 for r in results if isinstance(r, PermissionDenied)) == 1
    assert len(await trust.list()) == 1


async def test_tokens_need_a_name_and_are_for_clients(store: Store) -> None:
    trust = TrustStore(store)
    with pytest.raises(InvalidArgument, match="name"):
        await trust.create_token(CertificatePut())
    with pytest.raises(InvalidArgument, match="client certificates"):
        await trust.create_token(CertificatePut(name="m", type="metrics"))
