"""OpenID Connect bearer tokens against a real OpenID provider (npm oidc-provider, started
here): an api replica serving HTTPS with the real auth service beside it, configured with
LXD's `oidc.*` server keys; tokens from the provider's device-code flow, and tokens
forged with the provider's own signing key to try each claim check alone."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from croft.api.oidc import Verifier, replica_oidc
from croft.client import oidc as client_oidc
from croft.common.testing.etcd import EtcdServer, free_port
from croft.common.testing.oidc import OpenIDProvider, SigningKey

from .conftest import Reply
from .test_https import Croft, https_croft


@pytest.fixture
def croft(clean_store: EtcdServer) -> Iterator[Croft]:
    yield from https_croft(clean_store)


@pytest.fixture(scope="module")
def provider() -> Iterator[OpenIDProvider]:
    with OpenIDProvider(groups={"alice": ["devs", "ops"]}) as op:
        yield op


def bearer(
    croft: Croft,
    token: str | None,
    method: str = "GET",
    path: str = "/1.0",
    body: Any = None,
) -> Reply:
    """A request over HTTPS with no client certificate, and the token if any. Bounded:
    a server that never answers fails here, naming the request, instead of hanging the
    test until pytest-timeout ends it (once, at load 27, a test of this module hung)."""
    context = ssl.create_default_context(cafile=str(croft.state / "server.crt"))
    connection = http.client.HTTPSConnection("127.0.0.1", croft.port, context=context, timeout=90)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def configure(croft: Croft, op: OpenIDProvider, **extra: str) -> None:
    config = {
        "oidc.issuer": op.issuer,
        "oidc.client.id": "croft",
        "oidc.audience": op.audience,
        "oidc.groups.claim": "groups",
        **extra,
    }
    reply = croft.replica.request("PATCH", "/1.0", {"config": config})
    assert reply.status == 200, reply


def grant_admin(croft: Croft, idp_group: str = "devs") -> None:
    """Map the provider's group `idp_group` to a croft group that administers the server
    (an OIDC user is held to the grants of its groups: none without a mapping)."""
    root = croft.replica
    if root.request("GET", "/1.0/auth/groups/oidc-admins").status == 404:
        created = root.request("POST", "/1.0/auth/groups", {
            "name": "oidc-admins",
            "permissions": [{"entity_type": "server", "url": "/1.0", "entitlement": "admin"}],
        })  # fmt: skip
        assert created.status == 201, created
    if root.request("GET", f"/1.0/auth/identity-provider-groups/{idp_group}").status == 404:
        mapped = root.request("POST", "/1.0/auth/identity-provider-groups",
                              {"name": idp_group, "groups": ["oidc-admins"]})  # fmt: skip
        assert mapped.status == 201, mapped


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assert_refused(reply: Reply, token: str, op: OpenIDProvider, why: str) -> None:
    assert reply.status == 401, reply
    assert reply.json["type"] == "error" and reply.json["error_code"] == 401
    assert reply.error.startswith("Failed OIDC Authentication: "), reply.error
    assert why in reply.error, reply.error
    # Nothing of the token or of the server comes back; where to log in does.
    assert token not in reply.raw.decode() and "alice" not in reply.raw.decode()
    assert "environment" not in reply.raw.decode()
    assert reply.headers["X-LXD-OIDC-issuer"] == op.issuer
    assert reply.headers["X-LXD-OIDC-clientid"] == "croft"


# ---------------------------------------------------------------------------- settings


def test_oidc_keys_are_validated_and_advertised(croft: Croft, provider: OpenIDProvider) -> None:
    for key, value in (
        ("oidc.issuer", "not a url"),
        ("oidc.issuer", "ftp://example.test"),
        ("oidc.client.id", "two words"),
        ("oidc.groups.claim", "bad\nclaim"),
    ):
        reply = croft.replica.request("PATCH", "/1.0", {"config": {key: value}})
        assert reply.status == 400, reply
        assert reply.error.startswith(f"cannot set '{key}' to"), reply.error
    assert "oidc.issuer" not in croft.replica.request("GET", "/1.0").metadata["config"]

    untrusted = bearer(croft, None)
    assert untrusted.metadata["auth_methods"] == ["tls"]
    configure(croft, provider)
    assert bearer(croft, None).metadata["auth_methods"] == ["tls", "oidc"]
    # A refused stranger is told where to log in, as LXD tells it.
    refused = bearer(croft, None, path="/1.0/instances")
    assert refused.status == 403
    assert refused.headers["X-LXD-OIDC-issuer"] == provider.issuer
    assert refused.headers["X-LXD-OIDC-audience"] == provider.audience
    assert refused.headers["X-LXD-OIDC-groups-claim"] == "groups"
    # Unsetting the client ID turns OIDC off at once: the token is not looked at.
    token = provider.device_login("alice")["access_token"]
    assert bearer(croft, token).metadata["auth"] == "trusted"
    croft.replica.request("PATCH", "/1.0", {"config": {"oidc.client.id": ""}})
    off = bearer(croft, token)
    assert off.metadata["auth"] == "untrusted" and off.metadata["auth_methods"] == ["tls"]


# ---------------------------------------------------------------------------- good tokens


def test_a_device_flow_token_is_a_trusted_oidc_user(croft: Croft, provider: OpenIDProvider) -> None:
    configure(croft, provider)
    token = provider.device_login("alice")["access_token"]
    reply = bearer(croft, token)
    assert reply.status == 200, reply
    info = reply.metadata
    assert info["auth"] == "trusted"
    assert info["auth_user_method"] == "oidc"
    assert info["auth_user_name"] == "alice@example.test"
    # Recorded at its first request, to be put in groups by its subject.
    users = croft.replica.request("GET", "/1.0/auth/identities/oidc?recursion=1").metadata
    assert [(u["id"], u["name"], u["type"]) for u in users] == [
        ("alice", "alice@example.test", "OIDC client")]  # fmt: skip
    # Held to its groups' grants: none until its provider's group is mapped to one.
    assert "oidc.issuer" not in info["config"]
    refused = bearer(croft, token, "POST", "/1.0/profiles", {"name": "oidcprof", "config": {}})
    assert refused.status == 404, refused  # it may not even see the project
    grant_admin(croft)
    info = bearer(croft, token).metadata
    assert info["config"]["oidc.issuer"] == provider.issuer
    # The identity the handlers see: subject, name, the provider's groups.
    state = replica_oidc(croft.replica.app.state)  # type: ignore[union-attr]
    user = croft.replica.run(state.verifier(state.settings_now()).verify(token))  # type: ignore[arg-type]
    assert (user.subject, user.name, user.groups) == (
        "alice",
        "alice@example.test",
        ("devs", "ops"),
    )
    # It may change things, and its changes are its own in the lifecycle events.
    created = bearer(croft, token, "POST", "/1.0/profiles", {"name": "oidcprof", "config": {}})
    assert created.status == 201, created
    listed = bearer(croft, token, path="/1.0/profiles")
    assert "/1.0/profiles/oidcprof" in listed.metadata
    # The next request costs no verification, whatever the provider does meanwhile.
    fetches = state.verifier(state.settings_now()).jwks_fetches  # type: ignore[arg-type]
    provider.stop()
    try:
        assert bearer(croft, token).status == 200
    finally:
        provider.start()
    assert state.verifier(state.settings_now()).jwks_fetches == fetches  # type: ignore[arg-type]


def test_a_forged_token_with_good_claims_is_accepted(
    croft: Croft,
    provider: OpenIDProvider,
) -> None:
    """The checks below try one bad claim at a time: this one, with none, must pass."""
    configure(croft, provider)
    token = provider.sign(provider.claims("bob"))
    reply = bearer(croft, token)
    assert reply.status == 200 and reply.metadata["auth_user_name"] == "bob@example.test"


# ---------------------------------------------------------------------------- bad tokens


def test_bad_tokens_are_refused_with_401(croft: Croft, provider: OpenIDProvider) -> None:
    configure(croft, provider)
    now = int(time.time())
    good = provider.device_login("alice")["access_token"]
    head, body, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    public_pem = (
        provider.keys[0]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    hs_header = b64(
        json.dumps({"alg": "HS256", "typ": "JWT", "kid": provider.keys[0].kid}).encode()
    )
    hs_body = b64(json.dumps(provider.claims()).encode())
    hs_signature = b64(
        hmac.new(public_pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest()
    )
    stranger = SigningKey.new()
    stranger.kid = provider.keys[0].kid  # claims the provider's key id, signed by another
    cases = {
        "expired": (
            provider.sign(provider.claims(exp=now - 120, iat=now - 720)),
            "Token has expired",
        ),
        "not yet valid": (provider.sign(provider.claims(nbf=now + 3600)), "not valid yet"),
        "wrong audience": (provider.sign(provider.claims(aud="urn:other:api")), "audience"),
        "no audience": (
            provider.sign({k: v for k, v in provider.claims().items() if k != "aud"}),
            '"aud"',
        ),
        "wrong issuer": (
            provider.sign(provider.claims(iss="http://127.0.0.1:1")),
            "another issuer",
        ),
        "no subject": (
            provider.sign({k: v for k, v in provider.claims().items() if k != "sub"}),
            '"sub"',
        ),
        "tampered": (
            f"{head}.{b64(json.dumps({**claims, 'sub': 'root'}).encode())}.{signature}",
            "signature is invalid",
        ),
        "alg none": (
            f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(provider.claims()).encode())}.",
            "algorithm not allowed",
        ),
        "HS256 with the public key": (
            f"{hs_header}.{hs_body}.{hs_signature}",
            "algorithm not allowed",
        ),
        "unsigned": (f"{head}.{body}.", "signature is invalid"),
        "another key, same kid": (
            provider.sign(provider.claims(), key=stranger),
            "signature is invalid",
        ),
        "garbage": ("not-a-jwt", "Malformed token"),
    }
    for name, (token, why) in cases.items():
        reply = bearer(croft, token)
        assert_refused(reply, token, provider, why)
        assert reply.json["metadata"] is None, name
    # Not a bearer token at all.
    context = ssl.create_default_context(cafile=str(croft.state / "server.crt"))
    connection = http.client.HTTPSConnection("127.0.0.1", croft.port, context=context)
    connection.request("GET", "/1.0", headers={"Authorization": "Basic YWxpY2U6eA=="})
    response = connection.getresponse()
    assert response.status == 401 and b"expected a Bearer token" in response.read()
    connection.close()
    # Nothing was changed by any of them; the good token still works.
    for name, (token, _) in cases.items():
        reply = bearer(croft, token, "POST", "/1.0/profiles", {"name": "evil", "config": {}})
        assert reply.status == 401, (name, reply)
    assert "/1.0/profiles/evil" not in croft.replica.request("GET", "/1.0/profiles").metadata
    assert bearer(croft, good).status == 200


def test_a_cached_token_still_expires(croft: Croft, provider: OpenIDProvider) -> None:
    configure(croft, provider)
    token = provider.sign(provider.claims(exp=int(time.time()) + 10))
    assert bearer(croft, token).status == 200
    deadline = time.monotonic() + 30
    while (reply := bearer(croft, token)).status == 200:
        assert time.monotonic() < deadline, "a cached token outlived its exp"
        time.sleep(0.5)
    assert_refused(reply, token, provider, "Token has expired")


# ---------------------------------------------------------------------------- key rotation


def test_key_rotation_at_the_provider_is_followed(croft: Croft) -> None:
    with OpenIDProvider() as op:
        configure(croft, op)
        state = replica_oidc(croft.replica.app.state)  # type: ignore[union-attr]
        old = op.device_login("alice")["access_token"]
        assert bearer(croft, old).status == 200
        verifier: Verifier = state.verifier(state.settings_now())  # type: ignore[arg-type]
        fetched = verifier.jwks_fetches
        # The provider rotates: a new signing key, the old one still published.
        new_key = op.rotate()
        new = op.device_login("alice")["access_token"]
        assert jwt.get_unverified_header(new)["kid"] == new_key.kid
        deadline = time.monotonic() + 30
        while (reply := bearer(croft, new)).status != 200:
            # The unknown kid is fetched at most once per REFETCH_INTERVAL.
            assert reply.status == 401 and "unknown key" in reply.error, reply
            assert time.monotonic() < deadline, "the new key was never fetched"
            time.sleep(0.5)
        assert verifier.jwks_fetches > fetched
        assert bearer(croft, old).status == 200  # the old key is still published
        # Made-up key ids do not make croft fetch the keys again and again: at most once
        # per refetch interval, however slowly this loaded machine sends them.
        stranger = SigningKey.new()
        forged = [
            op.sign(op.claims(), key=SigningKey(f"made-up-{n}", stranger.private))
            for n in range(20)
        ]
        before, started = verifier.jwks_fetches, time.monotonic()
        for token in forged:
            assert bearer(croft, token).status == 401
        intervals = (time.monotonic() - started) / verifier.refetch_interval
        assert verifier.jwks_fetches - before <= 1 + int(intervals)
        assert verifier.jwks_fetches - before < len(forged)


# ---------------------------------------------------------------------------- croft login


def croft_command(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LXD_CONF": str(conf)}
    return subprocess.run(
        [sys.executable, "-m", "croft.client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_croft_login_runs_the_device_flow_and_refreshes(
    croft: Croft, provider: OpenIDProvider, tmp_path: Path
) -> None:
    configure(croft, provider)
    grant_admin(croft)
    conf = tmp_path / "lxc"
    (conf / "servercerts").mkdir(parents=True)
    (conf / "servercerts" / "depot.crt").write_text((croft.state / "server.crt").read_text())
    (conf / "config.yml").write_text(
        yaml.safe_dump(
            {"remotes": {"depot": {"addr": croft.url, "protocol": "lxd", "auth_type": "oidc"}}}
        )
    )
    # Before a login: a stranger.
    refused = croft_command(conf, "query", "depot:/1.0/instances")
    assert refused.returncode == 1 and "not authorized" in refused.stderr

    env = {**os.environ, "LXD_CONF": str(conf)}
    login = subprocess.Popen(
        [sys.executable, "-m", "croft.client.cli", "login", "depot"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert login.stdout is not None
        lines = []
        while not (line := login.stdout.readline()).startswith("Code: "):
            assert line, f"croft login ended: {lines} {login.stderr.read() if login.stderr else ''}"
            lines.append(line)
        assert lines[0].startswith(f"URL: {provider.issuer}/device")
        provider.approve(line.removeprefix("Code: ").strip(), "alice")  # the user, in a browser
        out, err = login.communicate(timeout=120)
    finally:
        if login.poll() is None:
            login.kill()
            login.wait()
    assert login.returncode == 0, err
    assert "Logged in to depot" in out
    tokens_file = conf / "oidctokens" / "depot.json"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    tokens = json.loads(tokens_file.read_text())
    assert tokens["refresh_token"] and tokens["issuer"] == provider.issuer

    # The croft command works as alice.
    shown = croft_command(conf, "query", "depot:/1.0")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert (info["auth_user_method"], info["auth_user_name"]) == ("oidc", "alice@example.test")
    made = croft_command(
        conf, "query", "-X", "POST", "-d", '{"name": "fromlogin"}', "depot:/1.0/profiles"
    )
    assert made.returncode == 0, made.stderr
    assert "/1.0/profiles/fromlogin" in croft.replica.request("GET", "/1.0/profiles").metadata

    # An expired access token is refreshed (and stored) before the request.
    tokens["expiry"] = "2000-01-01T00:00:00Z"
    tokens_file.write_text(json.dumps(tokens))
    assert croft_command(conf, "query", "depot:/1.0").returncode == 0
    refreshed = json.loads(tokens_file.read_text())
    assert refreshed["access_token"] != tokens["access_token"]
    assert refreshed["expiry"] > "2001"

    # An HTTP client of the remote works as alice; a token the remote refuses (401) is
    # refreshed once and the request made again.
    refreshed["access_token"] = provider.sign(provider.claims("alice", exp=int(time.time()) - 60))
    tokens_file.write_text(json.dumps(refreshed))
    with client_oidc.remote_client(client_oidc.Remote.named("depot", conf)) as http:
        reply = http.get("/1.0")
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"]["auth_user_method"] == "oidc"
    assert json.loads(tokens_file.read_text())["access_token"] != refreshed["access_token"]


def test_events_over_a_websocket_name_the_oidc_user(croft: Croft, provider: OpenIDProvider) -> None:
    """Over the asyncio websockets client: websockets' sync client reads the TLS socket
    in a thread of its own while the caller's thread writes the opening request on it,
    and under load (27, with other suites) one such connect sent no request and then
    waited forever joining its reader, stuck in an SSL read (the server had answered the
    TLS handshake and its session tickets, and waited for the request)."""
    configure(croft, provider)
    grant_admin(croft)
    token = provider.device_login("alice")["access_token"]
    context = ssl.create_default_context(cafile=str(croft.state / "server.crt"))
    url = f"wss://127.0.0.1:{croft.port}/1.0/events?type=lifecycle"

    async def watch() -> dict[str, Any]:
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(url, ssl=context, open_timeout=60,
                             additional_headers={"Authorization": "Bearer forged"})  # fmt: skip
        assert refused.value.response.status_code in (401, 403)
        async with ws_connect(url, ssl=context, open_timeout=60,
                              additional_headers={"Authorization": f"Bearer {token}"}) as ws:  # fmt: skip
            deadline = time.monotonic() + 30
            while croft.replica.ctx.hub.listeners == 0:
                assert time.monotonic() < deadline, "the listener never registered"
                await asyncio.sleep(0.05)
            made = await asyncio.to_thread(
                bearer, croft, token, "POST", "/1.0/profiles", {"name": "watched", "config": {}}
            )
            assert made.status == 201, made
            event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
        return event

    event = asyncio.run(watch())
    assert event["metadata"]["action"] == "profile-created"
    assert event["metadata"]["requestor"] == {
        "username": "alice@example.test",
        "protocol": "oidc",
        "address": "127.0.0.1",
    }


def test_an_unreachable_provider_refuses_new_tokens_with_403(
    croft: Croft, provider: OpenIDProvider
) -> None:
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configure(croft, provider, **{"oidc.issuer": gone})
    token = provider.sign(provider.claims(iss=gone))
    for _ in range(2):  # the second within the refetch interval: the same answer
        reply = bearer(croft, token)
        assert reply.status == 403, reply
        assert reply.error.startswith(
            "Failed OIDC Authentication: Authorization failed: Cannot get the OpenID provider's keys"
        ), reply.error
        assert reply.headers["X-LXD-OIDC-issuer"] == gone


# ---------------------------------------------------------------------------- userinfo


def test_groups_come_from_the_userinfo_endpoint_when_the_token_lacks_them(croft: Croft) -> None:
    """A provider that keeps groups out of its access tokens: croft asks its userinfo
    endpoint. Here the real provider issues opaque tokens (its userinfo endpoint takes no
    JWT issued for an API), which croft cannot check offline: the userinfo endpoint says
    who holds one, and its groups claim maps to croft groups as a token's would. With
    `oidc.audience` set an opaque token is refused: it cannot show it is croft's."""
    with OpenIDProvider(groups={"dana": ["devs"]}, opaque_tokens=True) as op:
        configure(croft, op, **{"oidc.audience": ""})
        grant_admin(croft)  # the provider group devs -> oidc-admins (server admin)
        token = op.device_login("dana", "openid email profile groups")["access_token"]
        assert token.count(".") != 2  # not a JWT: nothing in it to read
        reply = bearer(croft, token)
        assert reply.status == 200, reply
        info = reply.metadata
        assert (info["auth_user_method"], info["auth_user_name"]) == ("oidc", "dana@example.test")
        # An admin through the group only the userinfo endpoint told.
        assert info["config"]["oidc.issuer"] == op.issuer
        created = bearer(croft, token, "POST", "/1.0/profiles", {"name": "dana", "config": {}})
        assert created.status == 201, created
        state = replica_oidc(croft.replica.app.state)  # type: ignore[union-attr]
        user = croft.replica.run(state.verifier(state.settings_now()).verify(token))  # type: ignore[arg-type]
        assert (user.subject, user.groups) == ("dana", ("devs",))
        # Without the groups scope the provider tells no groups: no admin.
        plain = op.device_login("dana", "openid email profile")["access_token"]
        assert bearer(croft, plain).metadata["config"] == {}
        # A token the provider does not know is refused, as a bad JWT is.
        made_up = "x" * 43
        assert_refused(bearer(croft, made_up), made_up, op, "user info endpoint")
        # A JWT whose groups claim is missing: the userinfo endpoint is asked (this one
        # answers no JWT): the token stays good, with no provider groups.
        signed = op.sign({k: v for k, v in op.claims("dana").items() if k != "groups"})
        reply = bearer(croft, signed)
        assert (reply.status, reply.metadata["config"]) == (200, {}), reply
        # With an audience to check, an opaque token cannot pass.
        configure(croft, op)
        assert_refused(bearer(croft, token), token, op, "Malformed token")
        refused = bearer(croft, token, "POST", "/1.0/profiles", {"name": "late", "config": {}})
        assert refused.status == 401
    assert "/1.0/profiles/late" not in croft.replica.request("GET", "/1.0/profiles").metadata
