"""HTTPS with LXD's trust model, driven by the real `lxc` client and a plain TLS client:
an api replica serving HTTPS beside its unix socket, a real `python -m croft.auth` on the
same real etcd deciding who is trusted."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pylxd
import pylxd.exceptions
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from croft.api import services, trust_password
from croft.api.records import SERVER_CONFIG_KEY
from croft.api.serving import HttpsServer
from croft.api.tls import certificate_fingerprint, ensure_server_certificate
from croft.common import discovery
from croft.common.config import Config
from croft.common.service import ServiceContext
from croft.common.testing.etcd import EtcdServer, free_port

from .conftest import TEST_SETTINGS, Replica, Reply

PREFIX = "croft-https-test-"


@dataclass
class Client:
    """A TLS client with (or without) a certificate of its own."""

    port: int
    server_cert: Path
    cert: Path | None = None
    key: Path | None = None

    def request(self, method: str, path: str, body: Any = None) -> Reply:
        context = ssl.create_default_context(cafile=str(self.server_cert))
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context)
        try:
            payload = None if body is None else json.dumps(body)
            connection.request(method, path, body=payload)
            response = connection.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            connection.close()


@dataclass
class Croft:
    replica: Replica
    port: int
    state: Path
    base: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, name: str | None = None) -> Client:
        """A client; with a name, one holding a fresh certificate (CN=name)."""
        if name is None:
            return Client(self.port, self.state / "server.crt")
        key, cert = self.base / f"{name}.key", self.base / f"{name}.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-nodes", "-newkey", "ec"]
            + ["-pkeyopt", "ec_paramgen_curve:P-384", "-days", "30"]
            + ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"],
            check=True,
            capture_output=True,
        )
        return Client(self.port, self.state / "server.crt", cert, key)

    def lxc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`lxc` as root on the unix socket."""
        return self.replica.lxc(*args, check=check)

    def remote_lxc(self, home: Path) -> Any:
        """`lxc` as a remote user whose config lives in `home`."""
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "LXD_DIR"}
        env["HOME"] = str(home)

        def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(
                ["lxc", *args], env=env, capture_output=True, text=True, timeout=60
            )
            if check and result.returncode != 0:
                raise AssertionError(f"lxc {' '.join(args)}: {result.stdout}{result.stderr}")
            return result

        return run


def start_service(name: str, etcd: EtcdServer, base: Path) -> subprocess.Popen[bytes]:
    member = f"{PREFIX}{uuid.uuid4().hex[:6]}"
    config_file = base / f"{name}.yaml"
    config_file.write_text(
        f"member: {member}\nstate_dir: {base / name}\nlog_dir: {base / 'log'}\n"
        f"run_dir: {base / 'run'}\netcd:\n  endpoints: [{etcd.endpoint}]\n"
        "registry:\n  lease_ttl: 2\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROFT_")}
    env["CROFT_CONFIG"] = str(config_file)
    with open(base / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"croft.{name}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def croft(clean_store: EtcdServer) -> Iterator[Croft]:
    yield from https_croft(clean_store)


def https_croft(clean_store: EtcdServer) -> Iterator[Croft]:
    """An api replica serving HTTPS, with a real auth service (other modules' fixtures
    yield from this)."""
    base = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
    state = base / "state"
    certificate = ensure_server_certificate(state)
    port = free_port()
    settings = replace(
        TEST_SETTINGS, https_address=f"127.0.0.1:{port}", certificate=certificate.pem
    )
    replica = Replica(clean_store.endpoints, settings).start()
    auth = start_service("auth", clean_store, base)
    https: HttpsServer | None = None
    context: ServiceContext | None = None
    try:

        async def registered() -> bool:
            assert replica.store is not None
            found = await discovery.resolve(replica.store, "auth")
            return any(i.pid == auth.pid for i in found)

        deadline = time.monotonic() + 60
        while not replica.run(registered()):
            if auth.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((base / "auth.log").read_text())
            time.sleep(0.05)

        async def up() -> tuple[ServiceContext, HttpsServer]:
            assert replica.store is not None and replica.app is not None
            config = Config(member="croft-test", etcd={"endpoints": clean_store.endpoints})
            ctx = ServiceContext("api", config, replica.store, None, "api-test")  # type: ignore[arg-type]
            services.install(ctx)
            server = HttpsServer(replica.app, settings.https_address, certificate)
            await server.start()
            return ctx, server

        context, https = replica.run(up())
        yield Croft(replica, port, state, base)
    finally:

        async def down() -> None:
            if https is not None:
                await https.stop()
            if context is not None:
                for client in context._clients.values():
                    await client.close()
            services._services = None

        replica.run(down())
        replica.stop()
        stop_process(auth)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------- untrusted


def test_an_untrusted_client_sees_only_what_lxd_shows_strangers(croft: Croft) -> None:
    for client in (croft.client(), croft.client("stranger")):
        server = client.request("GET", "/1.0")
        assert server.status == 200
        assert server.metadata["auth"] == "untrusted"
        assert "environment" not in server.metadata and "config" not in server.metadata
        assert "certificate_token" in server.metadata["api_extensions"]
        for method, path in [
            ("GET", "/1.0/instances"),
            ("GET", "/1.0/certificates"),
            ("PUT", "/1.0"),
            ("GET", "/1.0/operations"),
            ("GET", "/1.0/images/aliases"),
            ("DELETE", "/1.0/images/abc"),
        ]:
            refused = client.request(method, path, {})
            assert (refused.status, refused.error) == (403, "not authorized"), (method, path)
        assert client.request("GET", "/1.0/images").metadata == []
        # Adding oneself takes a token.
        refused = client.request("POST", "/1.0/certificates", {"type": "client"})
        assert (refused.status, refused.error) == (403, "not authorized")
        refused = client.request("POST", "/1.0/certificates", {"password": "guess"})
        assert (refused.status, refused.error) == (403, "not authorized")
    assert croft.lxc("config", "trust", "list", "--format", "json").stdout.strip() == "[]"


# ---------------------------------------------------------------------------- tokens


def test_lxc_remote_add_with_a_token_then_trust_remove(croft: Croft) -> None:
    token = croft.lxc("config", "trust", "add", "--name", "laptop", "-q").stdout.strip()
    tokens = json.loads(croft.lxc("config", "trust", "list-tokens", "--format", "json").stdout)
    assert [t["ClientName"] for t in tokens] == ["laptop"]

    remote = croft.remote_lxc(croft.base / "laptop-home")
    remote("remote", "add", "croft", token)
    info = remote("info", "croft:").stdout
    assert "auth: trusted" in info
    server_fp = certificate_fingerprint((croft.state / "server.crt").read_text())
    assert f"certificate_fingerprint: {server_fp}" in info
    assert remote("list", "croft:", "--format", "json").stdout.strip() == "[]"

    trusted = json.loads(croft.lxc("config", "trust", "list", "--format", "json").stdout)
    assert [(c["name"], c["type"]) for c in trusted] == [("laptop", "client")]
    client_cert = (croft.base / "laptop-home/.config/lxc/client.crt").read_text()
    assert trusted[0]["fingerprint"] == certificate_fingerprint(client_cert)
    # The token is used up: its operation is gone from the list, and it trusts nobody else.
    tokens = json.loads(croft.lxc("config", "trust", "list-tokens", "--format", "json").stdout)
    assert tokens == []
    other = croft.remote_lxc(croft.base / "other-home")
    refused = other("remote", "add", "croft", token, check=False)
    assert refused.returncode != 0
    assert "No matching certificate add operation found" in refused.stderr

    croft.lxc("config", "trust", "remove", trusted[0]["fingerprint"][:12])
    refused = remote("list", "croft:", check=False)
    assert refused.returncode != 0 and "not authorized" in refused.stderr


def test_a_revoked_token_trusts_nobody(croft: Croft) -> None:
    token = croft.lxc("config", "trust", "add", "--name", "gone", "-q").stdout.strip()
    croft.lxc("config", "trust", "revoke-token", "gone")
    remote = croft.remote_lxc(croft.base / "gone-home")
    refused = remote("remote", "add", "croft", token, check=False)
    assert refused.returncode != 0
    assert "No matching certificate add operation found" in refused.stderr
    assert croft.lxc("config", "trust", "list", "--format", "json").stdout.strip() == "[]"


def test_remote_add_with_the_token_as_password(croft: Croft) -> None:
    token = croft.lxc("config", "trust", "add", "--name", "ci", "-q").stdout.strip()
    remote = croft.remote_lxc(croft.base / "ci-home")
    remote("remote", "add", "croft", croft.url, "--accept-certificate", "--password", token)
    assert "auth: trusted" in remote("info", "croft:").stdout


# ---------------------------------------------------------------------------- trust password


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> trust_password.PasswordAttempts:
    """A fresh failed-attempts count (this api replica runs in the test's process)."""
    fresh = trust_password.PasswordAttempts()
    monkeypatch.setattr(trust_password, "attempts", fresh)
    return fresh


def stored_server_config(croft: Croft) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        assert croft.replica.store is not None
        found = await croft.replica.store.get_json(SERVER_CONFIG_KEY)
        assert found is not None
        config: dict[str, Any] = found[0]["config"]
        return config

    return croft.replica.run(read())


def test_the_trust_password_is_kept_hashed_and_shown_as_true(croft: Croft) -> None:
    croft.lxc("config", "set", "core.trust_password", "s3cret")
    stored = stored_server_config(croft)["core.trust_password"]
    # LXD's form: hex of a 32-byte salt and a 64-byte scrypt hash.
    raw = bytes.fromhex(stored)
    assert len(raw) == 96 and b"s3cret" not in raw
    assert trust_password.password_matches(stored, "s3cret")
    assert not trust_password.password_matches(stored, "s3cret!")
    shown = croft.replica.request("GET", "/1.0").metadata["config"]
    assert shown["core.trust_password"] is True
    assert croft.lxc("config", "get", "core.trust_password").stdout.strip() == "true"
    # `lxc config set/unset` of another key sends the shown `true` back: it keeps the hash.
    croft.lxc("config", "set", "user.a", "b")
    croft.lxc("config", "unset", "user.a")
    assert stored_server_config(croft)["core.trust_password"] == stored
    croft.lxc("config", "unset", "core.trust_password")
    assert "core.trust_password" not in stored_server_config(croft)


def test_lxc_remote_add_with_the_trust_password(croft: Croft, attempts: Any) -> None:
    remote = croft.remote_lxc(croft.base / "pw-home")
    refused = remote(
        "remote", "add", "croft", croft.url, "--accept-certificate", "--password", "s3cret",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0  # no password is set yet
    croft.lxc("config", "set", "core.trust_password", "s3cret")
    refused = remote(
        "remote", "add", "croft", croft.url, "--accept-certificate", "--password", "wrong",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "not authorized" in refused.stderr
    remote("remote", "add", "croft", croft.url, "--accept-certificate", "--password", "s3cret")
    assert "auth: trusted" in remote("info", "croft:").stdout
    trusted = json.loads(croft.lxc("config", "trust", "list", "--format", "json").stdout)
    client_cert = (croft.base / "pw-home/.config/lxc/client.crt").read_text()
    assert [(c["fingerprint"], c["restricted"]) for c in trusted] == [
        (certificate_fingerprint(client_cert), False)
    ]


def test_pylxd_authenticates_with_the_trust_password(
    croft: Croft, attempts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests would verify against these bundles despite verify=False.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    croft.lxc("config", "set", "core.trust_password", "s3cret")
    croft.client("pylxd")  # makes pylxd.crt and pylxd.key
    cert = (str(croft.base / "pylxd.crt"), str(croft.base / "pylxd.key"))
    client = pylxd.Client(endpoint=croft.url, cert=cert, verify=False)
    assert not client.trusted
    with pytest.raises(pylxd.exceptions.LXDAPIException, match="not authorized"):
        client.authenticate("guess")
    client.authenticate("s3cret")
    assert client.trusted
    assert client.instances.all() == []


def test_failed_trust_passwords_are_rate_limited(croft: Croft, attempts: Any) -> None:
    croft.lxc("config", "set", "core.trust_password", "s3cret")
    guesser = croft.client("guesser")
    for _ in range(trust_password.MAX_FAILURES):
        refused = guesser.request("POST", "/1.0/certificates", {"password": "guess"})
        assert (refused.status, refused.error) == (403, "not authorized")
    # Now even the right password is refused from that address, and nothing is added.
    refused = guesser.request("POST", "/1.0/certificates", {"password": "s3cret"})
    assert refused.status == 403
    assert "Too many failed trust password attempts" in refused.error
    assert croft.lxc("config", "trust", "list", "--format", "json").stdout.strip() == "[]"
    assert guesser.request("GET", "/1.0").metadata["auth"] == "untrusted"


def test_no_token_without_https(replica: Replica) -> None:
    """The plain replica serves no HTTPS: LXD's answer, and nothing is created."""
    reply = replica.request(
        "POST", "/1.0/certificates", {"name": "x", "type": "client", "token": True}
    )
    assert (reply.status, reply.error) == (
        400,
        "Can't issue token when server isn't listening on network",
    )
    assert replica.request("GET", "/1.0/operations").metadata == {}


# ---------------------------------------------------------------------------- certificates


def test_lxc_config_trust_add_a_certificate_file(croft: Croft) -> None:
    client = croft.client("alice")
    assert client.request("GET", "/1.0").metadata["auth"] == "untrusted"

    croft.lxc("config", "trust", "add", str(client.cert))
    server = client.request("GET", "/1.0")
    assert server.metadata["auth"] == "trusted"
    environment = server.metadata["environment"]
    assert environment["certificate"] == (croft.state / "server.crt").read_text()
    assert environment["certificate_fingerprint"] == certificate_fingerprint(
        environment["certificate"]
    )
    assert environment["addresses"] == [f"127.0.0.1:{croft.port}"]
    assert client.request("GET", "/1.0/instances").status == 200

    assert client.cert is not None
    fingerprint = certificate_fingerprint(client.cert.read_text())
    record = client.request("GET", f"/1.0/certificates/{fingerprint}").metadata
    assert (record["name"], record["type"], record["restricted"]) == ("alice.crt", "client", False)

    # Already trusted: adding oneself again is refused as LXD refuses it.
    again = client.request("POST", "/1.0/certificates", {"type": "client"})
    assert (again.status, again.error) == (400, "Client is already trusted")
    duplicate = croft.lxc("config", "trust", "add", str(client.cert), check=False)
    assert duplicate.returncode != 0 and "already in trust store" in duplicate.stderr

    # A trusted client can itself remove trust (here its own).
    assert client.request("DELETE", f"/1.0/certificates/{fingerprint}").status == 200
    refused = client.request("GET", "/1.0/instances")
    assert (refused.status, refused.error) == (403, "not authorized")


def test_a_bad_certificate_is_refused(croft: Croft) -> None:
    bad = croft.base / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    reply = croft.replica.request(
        "POST", "/1.0/certificates", {"type": "client", "certificate": "bm90IGEgY2VydA=="}
    )
    assert reply.status == 400 and "Invalid certificate material" in reply.error
    assert croft.lxc("config", "trust", "list", "--format", "json").stdout.strip() == "[]"


def test_a_restricted_certificate_keeps_to_its_projects(croft: Croft) -> None:
    client = croft.client("contractor")
    croft.lxc("config", "trust", "add", str(client.cert), "--restricted", "--projects", "default")
    listed = json.loads(croft.lxc("config", "trust", "list", "--format", "json").stdout)
    assert [(c["restricted"], c["projects"]) for c in listed] == [(True, ["default"])]
    assert client.request("GET", "/1.0").metadata["auth"] == "trusted"
    assert client.request("GET", "/1.0/instances").status == 200
    assert client.request("GET", "/1.0/instances?project=default").status == 200
    for method, path in [
        ("GET", "/1.0/instances?project=other"),
        ("PUT", "/1.0"),
        ("POST", "/1.0/certificates"),
        ("DELETE", f"/1.0/certificates/{listed[0]['fingerprint']}"),
    ]:
        refused = client.request(method, path, {})
        assert (refused.status, refused.error) == (403, "not authorized"), (method, path)


# ---------------------------------------------------------------------------- the certificate


def test_the_server_certificate_is_made_once_as_lxd_makes_it(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    first = ensure_server_certificate(tmp_path / "state")
    assert (tmp_path / "state/server.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state/server.key").read_text().startswith("-----BEGIN EC PRIVATE KEY")
    cert = x509.load_pem_x509_certificate(first.pem.encode())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert "O=linuxcontainers.org" in cert.subject.rfc4514_string()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName)[0] == socket.gethostname()
    again = ensure_server_certificate(tmp_path / "state")
    assert again.fingerprint == first.fingerprint == certificate_fingerprint(first.pem)


@pytest.mark.parametrize("address", ["8443", "::1:8443", "host:0", "host:http"])
def test_a_bad_https_address_is_refused_at_start(address: str) -> None:
    with pytest.raises(ValueError, match="api.https_address|https_address"):
        Config(api={"https_address": address})


def test_a_restricted_certificate_sees_nothing_of_other_projects(croft: Croft) -> None:
    """A certificate restricted to project `pa` is refused (403, LXD's "not authorized")
    or shown nothing of `pb` whichever way it asks: by name, by `?project=`, across all
    projects, through an operation's URL, or through a `used_by` link."""
    for name, config in (("pa", {}), ("pb", {}), ("ps", {"features.profiles": "false"})):
        assert (
            croft.replica.request("POST", "/1.0/projects", {"name": name, "config": config}).status
            == 201
        )
    client = croft.client("tenant")
    croft.lxc("config", "trust", "add", str(client.cert), "--restricted", "--projects", "pa")

    assert client.request("GET", "/1.0/projects").metadata == ["/1.0/projects/pa"]
    server = client.request("GET", "/1.0?project=pa").metadata
    assert server["auth_user_method"] == "tls"
    assert server["auth_user_name"] == certificate_fingerprint(client.cert.read_text())
    assert server["config"] == {}
    assert croft.replica.request("GET", "/1.0").metadata["auth_user_name"] == "root"
    listed = client.request("GET", "/1.0/projects?recursion=1").metadata
    assert [p["name"] for p in listed] == ["pa"]
    assert client.request("GET", "/1.0/projects/pa").status == 200
    assert client.request("GET", "/1.0/profiles?project=pa").status == 200
    for method, path in [
        ("GET", "/1.0/projects/pb"),
        ("GET", "/1.0/projects/pb/state"),
        ("GET", "/1.0/instances?project=pb"),
        ("GET", "/1.0/instances?project=pa&all-projects=true"),
        ("GET", "/1.0/operations?project=pa&all-projects=true"),
        ("GET", "/1.0/profiles/default"),
        ("POST", "/1.0/projects"),
        ("PUT", "/1.0/projects/pa"),
        ("DELETE", "/1.0/projects/pb"),
        ("POST", "/1.0/profiles?project=pb"),
    ]:
        refused = client.request(method, path, {"name": "x"})
        assert (refused.status, refused.error) == (403, "not authorized"), (method, path)
    assert croft.replica.request("GET", "/1.0/projects/pb").status == 200

    # pb's events, or everyone's, are not its to follow.
    context = ssl.create_default_context(cafile=str(client.server_cert))
    context.load_cert_chain(str(client.cert), str(client.key))

    # (The asyncio client: the sync one can hang over TLS under load, test_oidc.py.)
    async def follow(query: str) -> None:
        url = f"wss://127.0.0.1:{croft.port}/1.0/events{query}"
        async with ws_connect(url, ssl=context, open_timeout=60):
            pass

    for query in ("?project=pb", "?project=pa&all-projects=true"):
        with pytest.raises(InvalidStatus) as refusal:
            asyncio.run(follow(query))
        assert refusal.value.response.status_code == 403
    asyncio.run(follow("?project=pa"))

    # An operation of pb, asked for through pa's name.
    async def hold() -> str:
        operation = await croft.replica.ctx.operations.create("Held", cls="token", project="pb")
        return str(operation["id"])

    op_id = croft.replica.run(hold())
    for method, path in [
        ("GET", f"/1.0/operations/{op_id}?project=pa"),
        ("GET", f"/1.0/operations/{op_id}/wait?project=pa&timeout=0"),
        ("DELETE", f"/1.0/operations/{op_id}?project=pa"),
    ]:
        refused = client.request(method, path)
        assert (refused.status, refused.error) == (403, "not authorized"), (method, path)
    assert croft.replica.request("GET", f"/1.0/operations/{op_id}").metadata["status"] == "Running"

    # default's profiles are used by ps's instances; a client of default does not see them.
    croft.replica.run(
        croft.replica.ctx.store.put(
            "/croft/records/instances/ps/hidden",
            json.dumps({"name": "hidden", "project": "ps", "profiles": ["default"]}).encode(),
        )
    )
    assert (
        "/1.0/instances/hidden?project=ps"
        in croft.replica.request("GET", "/1.0/profiles/default").metadata["used_by"]
    )
    other = croft.client("neighbour")
    croft.lxc("config", "trust", "add", str(other.cert), "--restricted", "--projects", "default")
    shown = other.request("GET", "/1.0/profiles/default")
    assert shown.status == 200 and shown.metadata["used_by"] == []
    assert other.request("GET", "/1.0/profiles?recursion=1").metadata[0]["used_by"] == []
